"""recipes/inspector_readouts.py: the fitted readout (accept threshold + defect biases) and
the verdicts it gives."""

import numpy as np

from tests.recipes import load_recipe


def test_biased_verdicts_keep_the_threshold_and_move_only_the_named_defect():
    r = load_recipe("inspector_readouts")
    probs = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.45, 0.35]])
    plain = r.biased_verdicts(probs, 0, 0.6, np.zeros(3))
    assert plain.tolist() == [0, 1, 1]
    # A bias on class 2 renames the defect of the last two images; the Available verdict
    # (P >= threshold) never moves, whatever the biases.
    moved = r.biased_verdicts(probs, 0, 0.6, np.array([0.0, 0.0, 0.5]))
    assert moved.tolist() == [0, 2, 2]
    assert r.biased_verdicts(probs, 0, 0.6, np.array([0.0, -3.0, 3.0]))[0] == 0


def test_fit_readout_finds_a_bias_that_the_labels_ask_for():
    r = load_recipe("inspector_readouts")
    rng = np.random.default_rng(0)
    n = 200
    labels = rng.integers(1, 3, n)  # defects 1 and 2 only
    probs = np.full((n, 3), 0.1)
    # The model under-calls defect 2: its probability sits a little under defect 1's.
    probs[:, 1] = np.where(labels == 2, 0.5, 0.7)
    probs[:, 2] = np.where(labels == 2, 0.4, 0.2)
    probs /= probs.sum(1, keepdims=True)
    before = (r.biased_verdicts(probs, 0, 0.9, np.zeros(3)) == labels).mean()
    t, bias = r.fit_readout(probs, labels, 0, 0.9)
    after = (r.biased_verdicts(probs, 0, t, bias) == labels).mean()
    assert before < 0.6 and after == 1.0
    assert bias[2] - bias[1] > np.log(0.5 / 0.4)
    # Nothing to gain: nothing moves.
    t2, bias2 = r.fit_readout(probs, np.where(probs[:, 1] > probs[:, 2], 1, 2), 0, 0.9)
    assert t2 == 0.9 and not bias2.any()


def test_threshold_margins_take_the_nearest_limit_and_skip_unmeasured_values():
    import pyarrow as pa

    r = load_recipe("inspector_readouts")
    limits = r.MARGIN_LIMITS
    nan = float("nan")
    table = pa.table({
        "contact_gap": [limits["contact_gap"] * 1.05, -limits["contact_gap"] * 3, nan],
        "scale_error": [nan, limits["scale_error"] * 0.8, nan],
        "hallucinated_area": [0.0, 0.0, nan],
        "contrast": [limits["contrast"] * 4, limits["contrast"] * 4, nan],
        "clutter": [0.0, 0.0, nan],
    })  # fmt: skip
    m = r.threshold_margins(table)
    assert np.allclose(m[:2], [0.05, 0.2]) and np.isinf(m[2])  # |-3x| is 2.0 away; 0.8x is 0.2
    rows = r.by_margin(np.array([False, True, True]), m)
    assert [(x["n"], x["errors"]) for x in rows] == [(1, 1), (1, 0), (0, 0), (1, 0)]


def test_every_candidate_gets_a_fitted_readout_and_test_is_read_only_on_adoption(world, tmp_path):
    import json
    from dataclasses import replace

    import torch

    from rewardkit.models.rfnet import EARLY_MODALITIES, RFNet, RFNetConfig
    from rewardkit.world.export import label_manifest

    r = load_recipe("inspector_readouts")
    label_manifest(world / "w" / "manifest.parquet", progress=False,
                   training_out=tmp_path / "T.parquet")  # fmt: skip
    config = RFNetConfig(fusion="early", modalities=EARLY_MODALITIES, width=8, resolution=32)
    for name, seed, threshold in (("a", 0, 0.5), ("b", 1, 0.9)):
        torch.manual_seed(seed)
        RFNet(replace(config, accept_threshold=threshold)).save_pretrained(tmp_path / name)
    labelled = str(tmp_path / "T.parquet")
    argv = ["--model", str(tmp_path / "a"), "--candidate", f"b={tmp_path / 'b'}",
            "--val", labelled, "--test", labelled]  # fmt: skip
    for gain in (100.0, -100.0):
        out = tmp_path / f"r{gain}.json"
        assert r.main([*argv, "--out", str(out), "--min-gain", str(gain)]) == 0
        result = json.loads(out.read_text())
        assert {"bias:shipped", "bias:b", "plain:b"} <= set(result["validation"])
        assert set(result["fitted_on_all_validation"]) == {"shipped", "b"}
        adopted = gain < 0 and result["chosen"] != "plain:shipped"
        assert result["adopted"] == adopted and ("test" in result) == adopted
        if adopted:
            assert set(result["test"]) == {"plain:shipped", result["chosen"]}
