"""Data larger than memory: decoded images on disk, rows read ahead by loader processes.

The loop's loader (``loader_workers``) must change nothing but when rows are read: the same
weights with 0 and 2 loader processes. The image store decodes in worker processes, is keyed
by the files' bytes, names a bad file in one line, and leaves no half-built folder behind.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rewardkit.training.image_store as image_store
import rewardkit.training.loop as loop
from rewardkit.io import write_png_atomic
from rewardkit.training.image_store import image_rows
from rewardkit.training.reward import (
    PretrainConfig,
    RewardTrainConfig,
    pretrain_contrastive,
    train_reward,
)
from tests.models.test_social_reward import make_tiny_clip
from tests.training.test_reward_recipes import _pairs_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return make_tiny_clip(root / "clip"), _pairs_dataset(root / "data")


def _weights(run):
    return load_file(run / "model" / "model.safetensors")


def test_loader_processes_give_the_same_weights_as_reading_in_the_step(setup, tmp_path):
    model, pairs = setup
    base = RewardTrainConfig(preset="all", lr=3e-3, batch_size=8, max_steps=5, grad_accum=2)
    train_reward(model, pairs, tmp_path / "a", base, progress=False)
    ahead = dataclasses.replace(base, loader_workers=2)
    train_reward(model, pairs, tmp_path / "b", ahead, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The decoded images were written once, into the run folder, not into memory.
    (store,) = (tmp_path / "a" / "data_cache").glob("images-*")
    assert (store / "images.npy").stat().st_size > 24 * 3 * 32 * 32


def test_no_recipe_decodes_the_whole_set_into_memory(setup, tmp_path, monkeypatch):
    model, pairs = setup
    monkeypatch.setattr(loop, "load_images", lambda *a, **k: pytest.fail("decoded in memory"))
    config = RewardTrainConfig(preset="all", lr=3e-3, batch_size=8, max_steps=1)
    train_reward(model, pairs, tmp_path / "r", config, progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = pairs.parent / "manifest.parquet"
    paths = [f"images/{i:03d}.png" for i in range(24)]
    pq.write_table(pa.table({"path": paths, "caption": [f"c{i % 3}" for i in range(24)]}), manifest)
    pre = PretrainConfig(lr=1e-3, batch_size=8, max_steps=1, text_column="caption")
    pretrain_contrastive(model, manifest, tmp_path / "c", pre, progress=False)


def _folder(root, n=70, size=20):
    rng = np.random.default_rng(0)
    for i in range(n):
        write_png_atomic(
            root / f"{i:03d}.png", rng.integers(0, 255, (size, size + i % 3, 3), np.uint8)
        )
    return [f"{i:03d}.png" for i in range(n)]


def test_the_store_holds_what_scoring_sees_decoded_by_workers(tmp_path):
    from rewardkit.io import decode_image
    from rewardkit.scoring import scorer_input

    paths = _folder(tmp_path / "img")
    rows = image_rows(paths, tmp_path / "img", 16, tmp_path / "cache", workers=2)
    assert len(rows) == 70 and rows.side == 16
    want = scorer_input(decode_image(tmp_path / "img" / paths[65], "RGB", 16), 16)
    got = rows[torch.tensor([65, 3, 65])]
    assert got.dtype == torch.uint8 and got.shape == (3, 3, 16, 16)
    assert np.array_equal(got[0].permute(1, 2, 0).numpy(), want) and torch.equal(got[0], got[2])


def test_the_store_is_reused_for_the_same_bytes_and_rebuilt_when_a_file_changes(
    tmp_path, monkeypatch
):
    paths = _folder(tmp_path / "img", n=6)
    first = image_rows(paths, tmp_path / "img", 16, tmp_path / "cache", workers=0)
    calls = []
    real = image_store._decode_chunk
    counted = lambda *a: calls.append(a[-1]) or real(*a)  # noqa: E731
    monkeypatch.setattr(image_store, "_decode_chunk", counted)
    again = image_rows(paths, tmp_path / "img", 16, tmp_path / "cache", workers=0)
    assert again.folder == first.folder and calls == []
    write_png_atomic(tmp_path / "img" / paths[2], np.zeros((20, 20, 3), np.uint8))
    changed = image_rows(paths, tmp_path / "img", 16, tmp_path / "cache", workers=0)
    assert changed.folder != first.folder and calls
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [changed.folder.name]
    assert int(changed[[2]].max()) == 0


def test_a_bad_file_is_one_line_naming_it_and_no_build_is_left(tmp_path):
    paths = _folder(tmp_path / "img", n=70)
    (tmp_path / "img" / paths[66]).write_bytes(b"not a png")
    with pytest.raises(ValueError) as err:
        image_rows(paths, tmp_path / "img", 16, tmp_path / "cache", workers=2)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "img" / paths[66]))
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="missing.png"):
        image_rows(["missing.png"], tmp_path / "img", 16, tmp_path / "cache")


def test_a_killed_build_is_cleaned_up_by_the_next(tmp_path):
    paths = _folder(tmp_path / "img", n=3)
    cache = tmp_path / "cache"
    key = image_store.content_key([tmp_path / "img" / p for p in paths], 16)
    dead = cache / f".images-{key[:16]}.building-999999999"  # no such process
    dead.mkdir(parents=True)
    live = cache / f".images-{key[:16]}.building-{os.getppid()}"  # a live process's build
    live.mkdir()
    image_rows(paths, tmp_path / "img", 16, cache, workers=0)
    assert not dead.exists() and live.exists()


def test_rfnet_reads_ahead_with_the_same_weights(world, tmp_path):
    """Degradation draws keyed by (seed, step, row) run in the loader processes: the same
    draws as in the step."""
    import yaml

    from rewardkit.commands.rfnet import train_rfnet_command
    from rewardkit.training.rfnet import RFNetTrainConfig
    from tests.training.test_rfnet_recipe import TINY

    model_yaml = tmp_path / "rfnet.yaml"
    model_yaml.write_text(yaml.safe_dump({**TINY, "dropout": 0.0}))
    manifest = world / "w" / "manifest.parquet"
    base = RFNetTrainConfig(epochs=1, batch_size=8, max_steps=3, lr=1e-3, degrade=0.5)
    for name, workers in (("a", 0), ("b", 2)):
        config = dataclasses.replace(base, loader_workers=workers)
        train_rfnet_command(manifest, tmp_path / name, config, model_yaml, maps="truth",
                            progress=False)  # fmt: skip
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
