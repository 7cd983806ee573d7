"""Disk-backed RFNet inspection data: the same batches as in memory, a content-keyed cache,
no pickle."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import rewardkit.training.inspection_store as store_module
from rewardkit.commands.rfnet import train_rfnet_command
from rewardkit.data.samples import load_adworld_manifest, split_by_product
from rewardkit.models.modalities import (
    load_modality,
)
from rewardkit.models.rfnet import MODALITIES, RFNetConfig
from rewardkit.training.inspection_store import RowFile, prepare_inspection_store
from rewardkit.training.rfnet import (
    RFNetTrainConfig,
    degrade_inspection_data,
    prepare_inspection_data,
)
from tests.training.test_rfnet_recipe import TINY


@pytest.fixture(scope="module")
def extractors(world):
    return {
        "depth_model": load_modality("depth", world / "depth"),
        "saliency_model": load_modality("saliency", world / "saliency"),
    }


@pytest.fixture(scope="module")
def samples(world):
    return split_by_product(load_adworld_manifest(world / "w" / "manifest.parquet"))


def _same_batches(a, b, rows, modalities=MODALITIES):
    x, y = a.batch(rows, modalities), b.batch(rows, modalities)
    assert x.keys() == y.keys()
    for key in x:
        if x[key] is None or y[key] is None:
            assert x[key] is None and y[key] is None, key
        else:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("maps", ["truth", "predicted"])
def test_store_gives_the_in_memory_batches(world, samples, extractors, tmp_path, maps):
    config = RFNetConfig(**TINY)
    kw = extractors if maps == "predicted" else {}
    memory = prepare_inspection_data(samples, config, maps=maps, progress=False, **kw)
    bad = degrade_inspection_data(memory, 17, predict_maps=maps == "predicted", **kw)
    # Chunks of 32 rows: the last chunk is ragged, and the degradation RNG spans chunks.
    store = prepare_inspection_store(samples, config, tmp_path / "cache", maps, degrade_seed=17,
                                     progress=False, chunk_rows=32, **kw)  # fmt: skip
    assert len(store) == len(memory) == 40
    assert store.classes == memory.classes and store.split == memory.split
    assert store.paths == memory.paths and torch.equal(store.labels, memory.labels)
    for split in ("train", "val", "test"):
        assert torch.equal(store.rows(split), memory.rows(split))
    rows = torch.tensor([5, 3, 4, 39, 0, 3])  # unsorted, adjacent, repeated
    _same_batches(memory, store, rows)
    _same_batches(memory, store, torch.arange(40))
    _same_batches(memory, store, rows, ("generated", "caption"))
    _same_batches(bad, store.degraded(), rows)
    assert not torch.equal(store.degraded().batch(rows)["generated"],
                           store.batch(rows)["generated"])  # fmt: skip
    tokens = np.load(tmp_path / "cache" / "caption_tokens.npy", allow_pickle=False)
    assert tokens.shape[0] == len(set(samples["caption"].to_pylist()))


def test_repeated_captions_are_stored_once(samples, tmp_path):
    import pyarrow as pa

    captions = samples["caption"].to_pylist()
    shared = [captions[i - i % 4] for i in range(len(captions))]  # 4 rows per caption
    table = samples.set_column(samples.column_names.index("caption"), "caption", pa.array(shared))
    config = RFNetConfig(**TINY, modalities=("generated", "caption"))
    memory = prepare_inspection_data(table, config, maps="truth", progress=False)
    store = prepare_inspection_store(table, config, tmp_path / "cache", "truth", progress=False)
    _same_batches(memory, store, torch.tensor([0, 1, 2, 3, 9, 4, 38]))
    tokens = np.load(tmp_path / "cache" / "caption_tokens.npy", allow_pickle=False)
    index = np.load(tmp_path / "cache" / "caption_index.npy", allow_pickle=False)
    assert tokens.shape[0] == len(set(shared)) == 10 and index.shape == (40,)


def test_store_is_reused_and_rebuilt_when_an_image_changes(world, samples, tmp_path, monkeypatch):
    config = RFNetConfig(**TINY, modalities=("product", "generated", "depth"))
    folder = tmp_path / "cache"
    first = prepare_inspection_store(samples, config, folder, "truth", progress=False)
    rows = torch.arange(40)
    before = first.batch(rows)

    def refuse(*args, **kwargs):
        raise AssertionError("decoded although the cache was valid")

    # Same content: nothing is decoded (the reader would raise).
    monkeypatch.setattr(store_module, "load_resized", refuse)
    monkeypatch.setattr(store_module, "load_product_rgb", refuse)
    again = prepare_inspection_store(samples, config, folder, "truth", progress=False)
    assert again.key == first.key
    _same_batches(first, again, rows)
    # Another degradation seed is another key: it rebuilds (and here, decodes).
    with pytest.raises(AssertionError, match="decoded although"):
        prepare_inspection_store(samples, config, folder, "truth", degrade_seed=1, progress=False)
    monkeypatch.undo()
    assert json.loads((folder / "meta.json").read_text())["key"] == first.key  # left intact

    # One generated image's bytes change (same path, same size): the cache is rebuilt.
    world_copy = tmp_path / "w"
    import shutil

    shutil.copytree(world / "w", world_copy)
    moved = load_adworld_manifest(world_copy / "manifest.parquet")
    moved = split_by_product(moved)
    target = moved["path"][7].as_py()
    from PIL import Image

    with Image.open(target) as im:
        pixels = np.asarray(im.convert("RGB")).copy()
    pixels[:] = 255 - pixels
    Image.fromarray(pixels).save(target)
    changed = prepare_inspection_store(moved, config, folder, "truth", progress=False)
    assert changed.key != first.key
    after = changed.batch(rows)
    assert not torch.equal(after["generated"][7], before["generated"][7])
    assert torch.equal(after["generated"][8], before["generated"][8])
    assert torch.equal(after["product"], before["product"])


def test_store_files_load_without_pickle_and_rows_are_checked(samples, extractors, tmp_path):
    config = RFNetConfig(**TINY)
    store = prepare_inspection_store(samples, config, tmp_path / "cache", "predicted",
                                     degrade_seed=3, progress=False, **extractors)  # fmt: skip
    files = sorted((tmp_path / "cache").glob("*.npy"))
    names = {f.stem for f in files}
    assert {"product", "generated", "depth", "saliency", "degraded_generated", "degraded_depth",
            "degraded_saliency", "caption_tokens", "caption_mask", "caption_index", "labels",
            "split"} <= names  # fmt: skip
    for f in files:
        array = np.load(f, allow_pickle=False)
        assert array.dtype != object
        if f.stem in ("product", "generated", "depth", "saliency"):
            assert array.shape[0] == 40
            assert np.array_equal(RowFile(f).read([2, 1]), array[[2, 1]])
    with pytest.raises(IndexError, match="rows outside"):
        store.batch(torch.tensor([40]))
    assert not list(tmp_path.glob(".cache.building-*"))  # the build folder is gone


def test_train_command_uses_the_store_and_reuses_it_on_resume(world, tmp_path, monkeypatch):
    import yaml

    model_yaml = tmp_path / "rfnet.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY))
    manifest = world / "w" / "manifest.parquet"
    train = RFNetTrainConfig(epochs=1, batch_size=8, max_steps=2, lr=1e-3)
    out = tmp_path / "run"
    first = train_rfnet_command(manifest, out, train, model_yaml, maps="truth", progress=False)
    assert (out / "data_cache" / "meta.json").is_file()
    assert (out / "data_cache" / "degraded_generated.npy").is_file()
    assert first["runs"]["full"]["steps"] == 2
    # Resumed with more steps: the cache is reused, nothing is decoded again.
    monkeypatch.setattr(store_module, "load_resized", lambda *a, **k: 1 / 0)
    more = dataclasses.replace(train, max_steps=3)
    again = train_rfnet_command(manifest, out, more, model_yaml, maps="truth", progress=False)
    assert again["runs"]["full"]["steps"] == 3 and again["samples"] == first["samples"]
