"""RFNet recipe, inspector and CLI on tiny models and a few AdWorld renders."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rewardkit.cli import main
from rewardkit.data.keys import read_training_keys
from rewardkit.data.samples import load_adworld_manifest, split_by_product
from rewardkit.models.inspector import INSPECTOR_FILE, Inspector
from rewardkit.models.rfnet import RFNet, RFNetConfig
from rewardkit.training.rfnet import (
    RFNetTrainConfig,
    average_precision,
    evaluate_rfnet,
    predict_rfnet,
    prepare_inspection_data,
    train_rfnet,
)

TINY = dict(width=32, heads=2, n_fusion=1, resolution=32,
            backbone={"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                      "layer_type": "basic"})  # fmt: skip


def test_average_precision_by_hand():
    # Positives at ranks 1 and 3: AP = (1/1 + 2/3) / 2.
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    assert ap == pytest.approx((1 + 2 / 3) / 2)
    # Two tied scores form one threshold: precision 1/2 at recall 1/2, then 2/3 at 1.
    ap = average_precision(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 1]))
    assert ap == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_evaluate_rfnet_by_hand():
    classes = ("Available", "Space Mismatch")
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 1])
    r = evaluate_rfnet(probs, labels, classes)
    # Said Available: rows 0, 1 (one right); Available rows: 0, 2.
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["f1"] == 0.5
    assert r["confusion"] == [[1, 1], [1, 1]] and r["accuracy"] == 0.5
    assert r["ap"] == pytest.approx((1 + 2 / 4) / 2)  # P(A): 0.9 (A), 0.6, 0.3, 0.2 (A)


def test_train_predict_and_inspector_gradients(world, tmp_path):
    samples = split_by_product(load_adworld_manifest(world / "w" / "manifest.parquet"))
    config = RFNetConfig(**TINY)
    data = prepare_inspection_data(samples, config, maps="truth", progress=False)
    assert data.generated.shape == (40, 3, 32, 32) and data.depth.shape == (40, 1, 32, 32)
    train = RFNetTrainConfig(epochs=2, batch_size=8, lr=1e-3)
    result = train_rfnet(data, tmp_path / "run", config, train, progress=False)
    assert result.steps == 2 * (len(data.rows("train")) // 8)
    model = RFNet.from_pretrained(tmp_path / "run" / "model")
    probs = predict_rfnet(model, data)
    assert probs.shape == (40, 6) and torch.allclose(probs.sum(1), torch.ones(40))
    # The inspector: extractors + RFNet, differentiable down to the generated pixels.
    (tmp_path / "run" / "model" / INSPECTOR_FILE).write_text(
        json.dumps({"depth": str(world / "depth"), "saliency": str(world / "saliency")})
    )
    inspector = Inspector.from_pretrained(tmp_path / "run" / "model")
    gen = data.generated[:2].float().div(255).requires_grad_(True)
    prod = data.product[:2].float().div(255)
    captions = [str(c) for c in samples["caption"].to_pylist()[:2]]
    inspector.available_log_prob(prod, gen, captions).sum().backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0


def test_cli_train_eval_inspect(world, tmp_path, capsys):
    model_yaml = tmp_path / "rfnet.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))
    manifest = str(world / "w" / "manifest.parquet")
    run = tmp_path / "runs"
    argv = ["train", "rfnet", "--manifest", manifest, "--out", str(run), "--ablation",
            "--model-config", str(model_yaml), "--maps", "truth", "--max-steps", "2",
            "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) == {"full", "image-only", "no-product", "no-generated",
                                    "no-depth", "no-saliency", "no-caption"}  # fmt: skip
    # The run records its training and validation products, not its test split.
    keys = read_training_keys(run / "full" / "model")
    samples = split_by_product(load_adworld_manifest(manifest))
    by_split = {}
    for k, sp in zip(samples["product_key"].to_pylist(), samples["split"].to_pylist(),
                     strict=True):  # fmt: skip
        by_split.setdefault(sp, set()).add(k)
    assert set(keys.products) == by_split["train"] | by_split["val"]
    assert not by_split["test"] & set(keys.products)
    # Evaluating on the training manifest is refused, naming the overlap ...
    out = tmp_path / "eval.json"
    argv = ["eval", "rfnet", "--manifest", manifest, "--runs", str(run), "--maps", "truth",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert manifest in err and "were seen by" in err and "--allow-overlap" in err
    assert not out.exists()
    # ... and reported with --allow-overlap.
    assert main([*argv, "--allow-overlap"]) == 0
    text = capsys.readouterr().out
    held = json.loads(out.read_text())["held_out"]
    n_seen = sum(1 for k in samples["product_key"].to_pylist() if k in keys.products)
    assert held["rows"] == 40 and held["seen_rows"] == n_seen and 0 < n_seen < 40
    assert "held-out check" in text
    assert "RFNet vs image-only baseline" in text and "Modality ablation" in text
    results = json.loads(out.read_text())["results"]
    assert set(results["full"]) == {"clean", "degraded"}
    # AdWorld manifests: agreement with the oracle's verdict on the very image judged.
    assert "Agreement with the AdWorld oracle" in text
    for cond in ("clean", "degraded"):
        r = results["full"][cond]
        assert r["oracle_n"] == 40
        assert 0 <= r["oracle_agreement"] <= r["oracle_binary_agreement"] <= 1
    model = run / "full" / "model"
    (model / INSPECTOR_FILE).write_text(
        json.dumps({"depth": str(world / "depth"), "saliency": str(world / "saliency")})
    )
    # A manifest with one missing image: reported and skipped, the rest inspected.
    table = pq.read_table(manifest)
    paths = table["path"].to_pylist()
    paths[0] = "images/missing.png"
    broken = world / "w" / "broken.parquet"
    pq.write_table(table.set_column(table.column_names.index("path"), "path",
                                    pa.array(paths)), broken)  # fmt: skip
    verdicts = tmp_path / "verdicts.parquet"
    argv = ["inspect", "--model", str(model), "--input", str(broken), "--out", str(verdicts)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inspected"] == 39 and summary["skipped"] == 1
    v = pq.read_table(verdicts)
    assert v.num_rows == 39 and "p_available" in v.column_names
    argv = ["inspect", "--model", str(model), "--input", str(tmp_path / "nope"), "--out", "x"]
    assert main(argv) == 2


def test_cli_train_rfnet_init_fine_tunes_a_saved_model(world, tmp_path, capsys):
    model_yaml = tmp_path / "rfnet.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))
    manifest = str(world / "w" / "manifest.parquet")
    first = tmp_path / "first"
    common = ["--maps", "truth", "--max-steps", "2", "--batch-size", "8"]
    argv = ["train", "rfnet", "--manifest", manifest, "--out", str(first),
            "--model-config", str(model_yaml), *common]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    second = tmp_path / "second"
    argv = ["train", "rfnet", "--manifest", manifest, "--out", str(second),
            "--init", str(first / "model"), "--lr", "0.01", *common]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"]["init"]["from"] == str(first / "model")
    a, b = RFNet.from_pretrained(first / "model"), RFNet.from_pretrained(second / "model")
    assert a.config == b.config  # the architecture of the model it started from
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # and it trained
    argv = ["train", "rfnet", "--manifest", manifest, "--out", str(tmp_path / "x"),
            "--init", str(first / "model"), "--ablation", *common]  # fmt: skip
    assert main(argv) == 2


def test_oracle_labels_match_world_label_and_judge_given_pixels(world):
    from rewardkit.commands.rfnet import agreement_with_oracle, oracle_labels
    from rewardkit.world.export import label_manifest

    manifest = world / "w" / "manifest.parquet"
    samples = load_adworld_manifest(manifest)
    labels = oracle_labels(samples, progress=False)
    table, errors = label_manifest(manifest, progress=False)
    assert errors == 0 and labels == table["oracle_label"].to_pylist()
    # Given pixels are judged instead of the files: the files' own pixels give the same.
    data = prepare_inspection_data(samples, RFNetConfig(**TINY, modalities=("generated",)),
                                   progress=False)  # fmt: skip
    assert oracle_labels(samples, data.generated, progress=False) == labels
    # A blank image where row 0 was: the oracle now judges something else there.
    blank = data.generated.clone()
    blank[0] = 255
    assert oracle_labels(samples, blank, progress=False)[0] != labels[0] or labels[0] in (
        "Unsuitable",  # decided by the product photo alone
    )
    r = agreement_with_oracle(
        ["Available", "Size Mismatch", "Available"], ["Available", "Available", None]
    )
    assert r == {"oracle_agreement": 0.5, "oracle_binary_agreement": 0.5, "oracle_n": 2}


def test_load_samples_concatenates_manifests_and_splits_by_product_across_them(world, tmp_path):
    from rewardkit.commands.rfnet import load_samples

    manifest = world / "w" / "manifest.parquet"
    one = load_samples(manifest)
    two = load_samples([manifest, manifest])
    assert two.num_rows == 2 * one.num_rows
    split_of: dict[str, set] = {}
    for key, split in zip(two["product_key"].to_pylist(), two["split"].to_pylist(), strict=True):
        split_of.setdefault(key, set()).add(split)
    assert all(len(s) == 1 for s in split_of.values())  # a product's rows stay together
    with pytest.raises(FileNotFoundError, match="nope"):
        load_samples([manifest, tmp_path / "nope"])


def test_training_draws_the_degraded_share_from_the_degraded_copy(world, tmp_path):
    import dataclasses

    samples = split_by_product(load_adworld_manifest(world / "w" / "manifest.parquet"))
    config = RFNetConfig(**TINY)
    data = prepare_inspection_data(samples, config, maps="truth", progress=False)

    def weights(run: str, degrade: float, copy) -> dict:
        train = RFNetTrainConfig(epochs=1, batch_size=8, lr=1e-3, degrade=degrade)
        train_rfnet(data, tmp_path / run, config, train, progress=False, degraded=copy)
        return RFNet.from_pretrained(tmp_path / run / "model").state_dict()

    clean = weights("clean", 0.0, None)
    same = weights("same", 1.0, data)  # a "degraded" copy identical to the data
    blank = dataclasses.replace(data, generated=torch.zeros_like(data.generated))
    blanked = weights("blank", 1.0, blank)
    assert all(torch.equal(clean[k], same[k]) for k in clean)  # nothing else changes
    assert any(not torch.equal(clean[k], blanked[k]) for k in clean)  # the copy is what's seen
    with pytest.raises(ValueError, match="degraded copy"):
        weights("bad", 1.0, dataclasses.replace(data, labels=data.labels[:3]))
