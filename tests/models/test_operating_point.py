"""The inspector's operating point: an accept threshold on P(Available), chosen on
validation samples and followed by every verdict (inspect, Recurrent Generation, eval)."""

import json

import numpy as np
import pytest
import torch

from rewardkit.commands.inspect import write_verdicts
from rewardkit.generation.recurrent import InspectorJudge
from rewardkit.models.inspector import Inspector
from rewardkit.models.rfnet import RFNet, RFNetConfig, verdict_indices
from rewardkit.training.rfnet import choose_accept_threshold, evaluate_rfnet

CLASSES = ("Available", "Space Mismatch", "Size Mismatch")


def test_verdicts_follow_the_threshold():
    probs = np.array(
        [
            [0.50, 0.30, 0.20],  # most probable: Available
            [0.40, 0.45, 0.15],  # most probable: Space Mismatch
            [0.80, 0.05, 0.15],
        ]
    )
    assert verdict_indices(probs, CLASSES, None).tolist() == [0, 1, 0]
    # At 0.6 only the third is Available; the others take their most probable defect.
    assert verdict_indices(probs, CLASSES, 0.6).tolist() == [1, 1, 0]
    # A low threshold accepts what the argmax would not.
    assert verdict_indices(torch.tensor(probs), CLASSES, 0.35).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="expected shape"):
        verdict_indices(probs[:, :2], CLASSES, 0.5)


def test_threshold_is_the_best_recall_at_the_precision():
    # P(Available) of 8 validation samples, highest first; truth Available = 1.
    p_a = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])
    truth = np.array([1, 1, 0, 1, 1, 0, 1, 0])
    probs = np.stack([p_a, 1 - p_a, np.zeros_like(p_a)], axis=1)
    labels = np.where(truth == 1, 0, 1)
    # Precision down the ranking: 1, 1, 2/3, 3/4, 4/5, 4/6, 5/7, 5/8.
    choice = choose_accept_threshold(probs, labels, CLASSES, 0.8)
    assert choice["accepted"] == 5 and choice["precision"] == pytest.approx(0.8)
    assert choice["recall"] == pytest.approx(4 / 5)
    assert 0.6 < choice["accept_threshold"] < 0.7
    # The verdicts at the chosen threshold give the figures it reports.
    ev = evaluate_rfnet(torch.tensor(probs), torch.tensor(labels), CLASSES,
                        choice["accept_threshold"])  # fmt: skip
    assert ev["precision"] == pytest.approx(0.8) and ev["recall"] == pytest.approx(0.8)
    assert choose_accept_threshold(probs, labels, CLASSES, 0.99)["accepted"] == 2
    with pytest.raises(ValueError, match="no Available sample"):
        choose_accept_threshold(probs[2:3], labels[2:3], CLASSES, 0.5)


def test_unreachable_precision_is_refused_naming_the_best():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    labels = np.array([1, 0])  # the most confident is wrong: best precision 1/2
    with pytest.raises(ValueError, match=r"--accept-precision 0.9: .*best precision 0.500"):
        choose_accept_threshold(probs, labels, CLASSES, 0.9)


def test_threshold_round_trips_and_bad_values_are_refused(tmp_path):
    backbone = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}
    tiny = dict(width=32, heads=2, n_fusion=1, resolution=32, classes=CLASSES, backbone=backbone)
    model = RFNet(RFNetConfig(**tiny, accept_threshold=0.7))
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["accept_threshold"] == 0.7 and saved["model_type"] == "rfnet"
    assert RFNet.from_pretrained(tmp_path / "m").config.accept_threshold == 0.7
    assert RFNetConfig(**tiny).accept_threshold is None  # old configs: the most probable class
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="accept_threshold"):
            RFNetConfig(**tiny, accept_threshold=bad)


class _Fixed(torch.nn.Module):
    """An inspector stand-in whose logits are given (log of fixed probabilities)."""

    def __init__(self, probs, threshold, loop=None):
        super().__init__()
        tiny = dict(width=32, heads=2, n_fusion=1, resolution=32, classes=CLASSES,
                    modalities=("generated",), accept_threshold=threshold, loop_threshold=loop,
                    backbone={"embedding_size": 8, "hidden_sizes": [8], "depths": [1]})  # fmt: skip
        self.rfnet = RFNet(RFNetConfig(**tiny))
        self.probs = torch.tensor(probs, dtype=torch.float32)

    classes = Inspector.classes
    accept_threshold = Inspector.accept_threshold
    verdicts = Inspector.verdicts
    device = Inspector.device
    uses_placement = Inspector.uses_placement

    def forward(self, product, generated, captions):
        return self.probs.log()


def test_recurrent_generation_and_inspect_follow_the_models_threshold(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    probs = [[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]
    photos = [np.full((8, 8, 4), 255, np.uint8)] * 2
    images = torch.rand(2, 3, 32, 32)
    for threshold, expected in ((None, ["Available", "Available"]),
                                (0.6, ["Space Mismatch", "Available"])):  # fmt: skip
        judge = InspectorJudge(_Fixed(probs, threshold))
        labels, scores = judge(images, ["p", "p"], photos=photos, captions=["c", "c"])
        assert labels == expected
        assert scores.tolist() == pytest.approx([0.5, 0.7])
        rows = pa.table({"path": ["a.png", "b.png"], "product_path": ["pa.png", "pb.png"],
                         "caption": ["c", "c"]})  # fmt: skip
        out = tmp_path / f"v-{threshold}.parquet"
        write_verdicts(out, rows, [0, 1], np.array(probs, np.float32), CLASSES, [], threshold)
        assert pq.read_table(out)["verdict"].to_pylist() == expected


def test_recurrent_generations_own_threshold_overrides_the_models():
    """``generate --accept-threshold T``: the loop accepts at T whatever the model's operating
    point (which ``inspect`` keeps); out-of-range values and uses without the inspector
    judge are refused naming the flag."""
    from rewardkit.commands.generate import make_judge

    probs = [[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]
    photos = [np.full((8, 8, 4), 255, np.uint8)] * 2
    images = torch.rand(2, 3, 32, 32)
    model = _Fixed(probs, 0.6)
    for threshold, expected in ((None, ["Space Mismatch", "Available"]),
                                (0.4, ["Available", "Available"]),
                                (0.8, ["Space Mismatch", "Space Mismatch"])):  # fmt: skip
        judge = InspectorJudge(model, threshold)
        labels, _ = judge(images, ["p", "p"], photos=photos, captions=["c", "c"])
        assert labels == expected, threshold
    assert model.accept_threshold == 0.6
    for bad in (0.0, 1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="--accept-threshold"):
            InspectorJudge(model, bad)
    with pytest.raises(ValueError, match="--accept-threshold: only with --until-accepted"):
        make_judge(True, "oracle", None, "cpu", 0.9)
    with pytest.raises(ValueError, match="--accept-threshold: only with --until-accepted"):
        make_judge(False, "inspector", None, "cpu", 0.9)


def test_the_models_loop_threshold_is_the_loops_default(tmp_path):
    """A ``loop_threshold`` in the config is Recurrent Generation's accept test unless
    ``--accept-threshold`` is given; ``inspect`` keeps the operating point; stats.json
    records the threshold the loop used."""
    from rewardkit.commands.generate import loop_accept_threshold

    probs = [[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]
    photos = [np.full((8, 8, 4), 255, np.uint8)] * 2
    images = torch.rand(2, 3, 32, 32)
    model = _Fixed(probs, 0.6, loop=0.75)
    for threshold, expected in ((None, ["Space Mismatch", "Space Mismatch"]),
                                (0.4, ["Available", "Available"])):  # fmt: skip
        labels, _ = InspectorJudge(model, threshold)(images, ["p", "p"], photos=photos,
                                                     captions=["c", "c"])  # fmt: skip
        assert labels == expected, threshold
    assert model.verdicts(model.probs) == ["Space Mismatch", "Available"]  # inspect's labels
    # Reports of how many images the inspector calls Available use inspect's labels.
    labels, _ = InspectorJudge.at_operating_point(model)(images, ["p", "p"], photos=photos,
                                                         captions=["c", "c"])  # fmt: skip
    assert labels == ["Space Mismatch", "Available"]
    labels, _ = InspectorJudge.at_operating_point(_Fixed(probs, None, loop=0.75))(
        images, ["p", "p"], photos=photos, captions=["c", "c"])  # fmt: skip
    assert labels == ["Available", "Available"]  # no operating point: the most probable class
    with pytest.raises(ValueError, match="loop_threshold"):
        RFNetConfig(loop_threshold=1.0)
    folder = tmp_path / "m"
    model.rfnet.save_pretrained(folder)
    assert RFNetConfig.from_folder(folder).loop_threshold == 0.75
    assert loop_accept_threshold(True, "inspector", folder, None) == 0.75
    assert loop_accept_threshold(True, "inspector", folder, 0.9) == 0.9
    assert loop_accept_threshold(True, "oracle", folder, None) is None
    assert loop_accept_threshold(False, "inspector", folder, None) is None
    _Fixed(probs, 0.6).rfnet.save_pretrained(tmp_path / "n")  # no loop threshold: the point
    assert loop_accept_threshold(True, "inspector", tmp_path / "n", None) == 0.6
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        RFNetConfig.from_folder(tmp_path)


def test_train_rfnet_writes_the_operating_point_chosen_on_validation(tmp_path):
    import yaml

    from rewardkit.commands.rfnet import train_rfnet_command
    from rewardkit.training.rfnet import RFNetTrainConfig
    from rewardkit.world.export import render_world
    from tests.training.test_rfnet_recipe import TINY

    # Mostly Available, so that the validation split holds some.
    render_world(tmp_path / "w", 40, seed=5, size=32, balance="Available=0.7,Space Mismatch=0.3",
                 progress=False)  # fmt: skip
    model_yaml = tmp_path / "rfnet.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))
    train = RFNetTrainConfig(epochs=1, batch_size=8, max_steps=2, lr=1e-3)
    out = tmp_path / "run"
    plain = train_rfnet_command(tmp_path / "w" / "manifest.parquet", out, train, model_yaml,
                                maps="truth", progress=False)  # fmt: skip
    assert "operating_point" not in plain["runs"]["full"]
    assert RFNet.from_pretrained(out / "model").config.accept_threshold is None
    # Again with a target precision that a barely trained model can reach.
    out2 = tmp_path / "run2"
    summary = train_rfnet_command(tmp_path / "w" / "manifest.parquet", out2, train, model_yaml,
                                  maps="truth", progress=False, accept_precision=0.05)  # fmt: skip
    point = summary["runs"]["full"]["operating_point"]
    assert point["precision"] >= 0.05 and 0 < point["accept_threshold"] < 1
    model = RFNet.from_pretrained(out2 / "model")
    assert model.config.accept_threshold == pytest.approx(point["accept_threshold"])
    assert (out2 / "model" / "training_keys.parquet").is_file()  # the other files are kept
