"""Measurement heads (``RFNetConfig.measurements``, ``RFNetTrainConfig.measurement_weight``;
issue 23, beyond the paper): the oracle's measurements as a second teacher beside the verdict."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from rewardkit.cli import main
from rewardkit.data.samples import load_adworld_manifest, split_by_product
from rewardkit.models.rfnet import EARLY_MODALITIES, RFNet, RFNetConfig
from rewardkit.training.inspection_store import prepare_inspection_store, store_key
from rewardkit.training.rfnet import (
    MEASUREMENT_HEADS,
    RFNetTrainConfig,
    measurement_targets,
    prepare_inspection_data,
    train_rfnet,
)
from rewardkit.world.export import label_manifest
from rewardkit.world.oracle import TARGET_KINDS, Thresholds, decide, measurement_target

TINY_EARLY = dict(fusion="early", modalities=list(EARLY_MODALITIES), width=8, resolution=32)
TRAIN = dict(epochs=2, batch_size=8, lr=2e-3, schedule="onecycle", degrade=0.0,
             degraded_copy=False)  # fmt: skip


@pytest.fixture(scope="module")
def labelled(world, tmp_path_factory):
    """The world's renders labelled by the oracle: (training manifest, measurements table)."""
    out = tmp_path_factory.mktemp("labelled")
    measured, errors = label_manifest(
        world / "w" / "manifest.parquet", out / "L.parquet", progress=False,
        training_out=out / "T.parquet",
    )  # fmt: skip
    assert errors == 0
    return out / "T.parquet", measured


def test_targets_are_measurements_in_units_of_their_thresholds():
    t = Thresholds()
    # at the threshold: 1 (signed), 0 (offset and log2); the sign of a gap survives
    gap = measurement_target(np.array([t.contact_gap, -t.contact_gap, 0.0]), "contact_gap")
    assert np.allclose(gap, [1, -1, 0])
    assert np.allclose(measurement_target(np.array([t.contrast]), "contrast"), [0])
    area = measurement_target(np.array([t.hallucinated_area, 0.0, np.nan]), "hallucinated_area")
    assert area[0] == pytest.approx(0) and area[1] < -3 and np.isnan(area[2])
    assert measurement_target(np.array([1e6]), "scale_error")[0] == 4.0  # clipped
    with pytest.raises(ValueError, match="measurement 'prop_kind': expected one of"):
        measurement_target(np.zeros(1), "prop_kind")
    # crossing a target's threshold is crossing the oracle's: |t| > 1, offset < 0, log2 > 0
    m = {"truncation": 0.0, "matte_defect": 0.0, "contact_gap": 0.0, "contrast": 1.0,
         "clutter": 0.0, "hallucinated_area": 0.0, "scale_error": float("nan")}  # fmt: skip
    assert decide(m) == "Available"
    for name, over in (("contact_gap", 1.2 * t.contact_gap), ("scale_error", 1.2 * t.scale_error),
                       ("hallucinated_area", 1.2 * t.hallucinated_area)):  # fmt: skip
        target = measurement_target(np.array([over]), name)[0]
        assert decide({**m, name: over}) != "Available"
        assert (target > 1) if TARGET_KINDS[name] == "signed" else (target > 0)


def test_training_manifest_carries_the_measurements(labelled):
    manifest, measured = labelled
    table = pq.read_table(manifest)
    for name in TARGET_KINDS:
        got = table[f"oracle_{name}"].to_numpy(zero_copy_only=False)
        want = measured[name].to_numpy(zero_copy_only=False)
        assert np.allclose(got, want, equal_nan=True), name
    samples = load_adworld_manifest(manifest)
    targets = measurement_targets(samples, MEASUREMENT_HEADS)
    assert targets.shape == (table.num_rows, len(MEASUREMENT_HEADS))
    assert np.isfinite(targets[:, MEASUREMENT_HEADS.index("contact_gap")]).all()
    with pytest.raises(ValueError, match="column 'oracle_clutter' missing: .*world label"):
        measurement_targets(samples.drop_columns(["oracle_clutter"]), ("clutter",))


def test_heads_config_forward_and_weights(tmp_path):
    config = RFNetConfig(**TINY_EARLY, measurements=["contact_gap", "scale_error"])
    assert config.measurements == ("contact_gap", "scale_error")
    with pytest.raises(ValueError, match="measurements: distinct names from"):
        RFNetConfig(**TINY_EARLY, measurements=("contact_gap", "height"))
    with pytest.raises(ValueError, match="measurement heads need fusion: early"):
        RFNetConfig(measurements=("contact_gap",))
    model = RFNet(config).eval()
    x = {"product": torch.rand(2, 3, 32, 32), "generated": torch.rand(2, 3, 32, 32),
         "placed": torch.rand(2, 4, 32, 32), "height_cm": torch.tensor([10.0, 80.0])}  # fmt: skip
    logits, measured = model(**x, measurements=True)
    assert logits.shape == (2, 6) and measured.shape == (2, 2)
    assert torch.equal(model(**x), logits)  # the verdict does not depend on the heads
    model.save_pretrained(tmp_path / "m")
    loaded = RFNet.from_pretrained(tmp_path / "m")
    assert loaded.config.measurements == config.measurements
    assert torch.allclose(loaded(**x, measurements=True)[1], measured)
    plain = RFNet(RFNetConfig(**TINY_EARLY)).eval()
    with pytest.raises(ValueError, match="no measurement heads"):
        plain(**x, measurements=True)
    before = plain(**x)
    plain.add_measurement_heads(["clutter"])
    assert plain.config.measurements == ("clutter",) and torch.equal(plain(**x), before)
    with pytest.raises(ValueError, match="already has measurement heads"):
        plain.add_measurement_heads(["clutter"])


def _head_change(model_dir, init) -> float:
    a = RFNet.from_pretrained(init).measure.state_dict()
    b = RFNet.from_pretrained(model_dir).measure.state_dict()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_training_on_disk_and_in_memory(labelled, tmp_path):
    manifest, _ = labelled
    samples = split_by_product(load_adworld_manifest(manifest))
    config = RFNetConfig(**TINY_EARLY)
    data = prepare_inspection_data(samples, config, progress=False, measurements=MEASUREMENT_HEADS)
    store = prepare_inspection_store(samples, config, tmp_path / "store", degrade_seed=5,
                                     progress=False, measurements=MEASUREMENT_HEADS)  # fmt: skip
    assert store.measurements == MEASUREMENT_HEADS
    assert torch.allclose(store.targets, data.targets, equal_nan=True)
    assert torch.allclose(store.degraded().targets, data.targets, equal_nan=True)
    # the targets are part of what the store is made of; without heads the key is as before
    keys = [store_key(samples, config, "predicted", None, {}, measurements=m)
            for m in ((), ("clutter",), MEASUREMENT_HEADS)]  # fmt: skip
    assert len(set(keys)) == 3
    train = RFNetTrainConfig(**TRAIN, measurement_weight=1.0)
    train_rfnet(store, tmp_path / "run", config, train, progress=False)
    model = RFNet.from_pretrained(tmp_path / "run" / "model")
    assert model.config.measurements == MEASUREMENT_HEADS
    # a model with heads trained on: weight 0 leaves them, weight > 0 moves them
    for weight, moved in ((0.0, False), (1.0, True)):
        out = tmp_path / f"ft{weight}"
        train_rfnet(data, out, None, dataclasses.replace(train, measurement_weight=weight),
                    init=tmp_path / "run" / "model", progress=False)  # fmt: skip
        change = _head_change(out / "model", tmp_path / "run" / "model")
        assert (change > 1e-5) == moved, (weight, change)  # (weight decay alone: ~1e-7)
    plain = prepare_inspection_data(samples, config, progress=False)
    with pytest.raises(ValueError, match="measurement_weight > 0 but the data has no"):
        train_rfnet(plain, tmp_path / "bad", config, train, progress=False)
    with pytest.raises(ValueError, match="measurement_weight: must be >= 0"):
        RFNetTrainConfig(**TRAIN, measurement_weight=-1.0)
    with pytest.raises(ValueError, match="need an early-fusion RFNet"):
        train_rfnet(data, tmp_path / "late", RFNetConfig(resolution=32), train, progress=False)


def test_cli_trains_heads_and_adds_them_to_an_init_model(labelled, world, tmp_path, capsys):
    manifest, _ = labelled
    model_yaml = tmp_path / "early.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY_EARLY))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({**TRAIN, "measurement_weight": 1.0}))
    base = ["train", "rfnet", "--manifest", str(manifest), "--config", str(cfg), "--max-steps", "2"]
    assert main([*base, "--out", str(tmp_path / "plain"), "--model-config", str(model_yaml)]) == 0
    capsys.readouterr()
    # an init model without heads gets new ones; its other weights start as they were
    plain = RFNet.from_pretrained(tmp_path / "plain" / "model")
    plain.measure = None
    plain.config = dataclasses.replace(plain.config, measurements=())
    plain.save_pretrained(tmp_path / "noheads")
    assert main([*base, "--out", str(tmp_path / "ft"), "--init", str(tmp_path / "noheads")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"]["init"]["steps"] == 2
    assert RFNet.from_pretrained(tmp_path / "ft" / "model").config.measurements == (
        MEASUREMENT_HEADS
    )
    # a manifest without the oracle's measurements: one line naming the column
    bare = world / "w" / "manifest.parquet"
    argv = ["train", "rfnet", "--manifest", str(bare), "--config", str(cfg), "--max-steps", "2",
            "--out", str(tmp_path / "bare"), "--model-config", str(model_yaml)]  # fmt: skip
    assert main(argv) == 2
    assert f"{bare}: column 'oracle_contact_gap' missing" in capsys.readouterr().err
