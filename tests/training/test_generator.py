"""`rewardkit train generator` on a handful of renders: both stages run, resume, and the
result loads as a pipeline folder."""

import json
import pickle
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from rewardkit.cli import main
from rewardkit.generation.default import build_generator
from rewardkit.generation.pipeline import AdGenerator
from rewardkit.io import read_image_rgb, write_png_atomic
from rewardkit.training import generator as tg
from rewardkit.training.generator import (
    DiffusionTrainConfig,
    VAETrainConfig,
    train_generator,
)
from rewardkit.training.rowfiles import RowArray
from rewardkit.world.export import render_world

from ..generation.conftest import TINY


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    out = tmp_path_factory.mktemp("renders")
    render_world(out, n=12, seed=3, size=32, progress=False)
    return out / "manifest.parquet"


def test_train_generator_tiny_resumes_and_loads(tmp_path, renders):
    vae = VAETrainConfig(max_steps=2, batch_size=4, checkpoint_every=1)
    diff = DiffusionTrainConfig(max_steps=2, batch_size=4, probe_every=2, probe_steps=2,
                                checkpoint_every=1)  # fmt: skip
    summary = train_generator(renders, tmp_path / "run", TINY, vae, diff, probe_manifest=renders,
                              probe_size=3, progress=False)  # fmt: skip
    assert summary["vae"]["steps"] == 2 and summary["diffusion"]["steps"] == 2
    probes = summary["diffusion"]["probes"]
    assert len(probes) == 1 and 0 <= probes[0]["probe_available"] <= 1
    assert sum(probes[0]["probe_counts"].values()) == 3
    gen = AdGenerator.from_pretrained(tmp_path / "run" / "model")
    assert gen.resolution == 32
    card = json.loads((tmp_path / "run" / "model" / "rewardkit_generator.json").read_text())
    assert card["diffusion_steps"] == 2
    # Caches are row files (.npy read without pickle); the only .pt files are optimiser
    # states (read weights_only).
    assert (tmp_path / "run" / "data_cache" / "images.npy").is_file()
    assert (tmp_path / "run" / "diffusion" / "latents" / "latents.npy").is_file()
    assert {p.name for p in (tmp_path / "run").rglob("*.pt")} == {"optimizer.pt"}
    # Exporting the checkpoint gives the weights the finished run saved.
    from rewardkit.training.generator import export_checkpoint

    finished = AdGenerator.from_pretrained(tmp_path / "run" / "model").unet.state_dict()
    exported = AdGenerator.from_pretrained(export_checkpoint(tmp_path / "run", TINY))
    for name, value in exported.unet.state_dict().items():
        torch.testing.assert_close(value, finished[name])
    # A longer budget resumes from the checkpoint (the VAE stage is reused as is).
    diff4 = DiffusionTrainConfig(max_steps=4, batch_size=4, probe_every=0, checkpoint_every=1)
    before = AdGenerator.from_pretrained(tmp_path / "run" / "model").vae
    again = train_generator(renders, tmp_path / "run", TINY, vae, diff4, progress=False,
                            decoder_config=VAETrainConfig(max_steps=2, batch_size=4))  # fmt: skip
    # The decoder fine-tune changes the decoder only: the latent space stays.
    after = AdGenerator.from_pretrained(tmp_path / "run" / "model").vae
    assert again["vae_decoder"]["steps"] == 2
    for name, value in before.state_dict().items():
        same = torch.equal(value, after.state_dict()[name])
        assert same == (not name.startswith(("decoder.", "post_quant_conv."))), name
    assert again["diffusion"]["steps"] == 4
    assert again["vae"] == summary["vae"]
    state = json.loads((tmp_path / "run" / "diffusion" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4
    # The EMA weights, not the raw ones, are what was saved.
    from safetensors.torch import load_file

    ckpt = load_file(tmp_path / "run" / "diffusion" / "checkpoint" / "trainable.safetensors")
    saved = AdGenerator.from_pretrained(tmp_path / "run" / "model").unet.state_dict()
    name = next(n for n in saved if n.endswith("conv_in.weight"))
    torch.testing.assert_close(saved[name], ckpt[f"buffer:ema.unet.{name}"])
    assert not torch.equal(saved[name], ckpt[f"unet.{name}"])


def test_train_generator_cli_rejects_bad_manifest(tmp_path):
    bad = tmp_path / "m.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["a.png"]}), bad)
    rc = main(["train", "generator", "--manifest", str(bad), "--out", str(tmp_path / "o"),
               "--no-progress"])  # fmt: skip
    assert rc == 2


class _Evil:
    """A pickle that, when loaded, creates the file ``marker`` (stands in for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_data_cache_is_row_files_keyed_by_content_and_never_unpickled(
    tmp_path, renders, monkeypatch
):
    world = tmp_path / "world"
    shutil.copytree(renders.parent, world)
    manifest = world / "manifest.parquet"
    marker = tmp_path / "code_ran"
    cache = tmp_path / "data_cache"
    cache.mkdir()
    (cache / "images.npy").write_bytes(pickle.dumps(_Evil(marker)))  # a planted pickle
    first = tg.prepare_generator_data(manifest, 32, cache, progress=False)
    assert not marker.exists()
    assert sorted(p.name for p in cache.iterdir()) == [
        "control.npy", "images.npy", "inpaint.npy", "meta.json", "product.npy",
    ]  # fmt: skip
    assert isinstance(first.images, RowArray) and first.images.shape == (12, 3, 32, 32)
    # What the in-process decode gives, read back from disk.
    with_workers = tg.prepare_generator_data(manifest, 32, tmp_path / "other", False, workers=2)
    for name in tg.DATA_ARRAYS:
        assert torch.equal(getattr(first, name)[:], getattr(with_workers, name)[:]), name
    # A hit decodes no image: the content key alone decides.
    monkeypatch.setattr(tg, "read_image_rgb", lambda path: 1 / 0)
    again = tg.prepare_generator_data(manifest, 32, cache, progress=False)
    assert again.fingerprint == first.fingerprint and again.prompts == first.prompts
    assert torch.equal(again.images[:], first.images[:])
    assert torch.equal(again.inpaint[[3, 1]], first.inpaint[:4][[3, 1]])
    # The same renders elsewhere share the key.
    moved = tmp_path / "moved"
    shutil.copytree(world, moved)
    elsewhere = tg.prepare_generator_data(moved / "manifest.parquet", 32, cache, False)
    assert elsewhere.fingerprint == first.fingerprint
    # A re-render (same names, rows and size, other pixels) does not.
    before = first.images[:]
    monkeypatch.setattr(tg, "read_image_rgb", read_image_rgb)
    rel = pq.read_table(manifest)["path"][0].as_py()
    write_png_atomic(world / rel, 255 - read_image_rgb(world / rel))
    changed = tg.prepare_generator_data(manifest, 32, cache, progress=False)
    assert changed.fingerprint != first.fingerprint
    assert torch.equal(changed.images[0], 255 - before[0])
    assert torch.equal(changed.images[1:], before[1:])
    # A file the manifest names that is gone: an error naming the row and file.
    (world / rel).unlink()
    with pytest.raises(ValueError, match=rf"manifest.parquet: row 0: .*{rel}: image file not"):
        tg.prepare_generator_data(manifest, 32, cache, progress=False)
    # Without a cache folder: a temporary one, gone with the data.
    temp = tg.prepare_generator_data(renders, 32, None, progress=False)
    folder = temp.images.file.path.parent
    assert folder.is_dir()
    del temp
    import gc

    gc.collect()
    assert not folder.exists()


def test_latent_cache_is_rebuilt_over_old_caches(tmp_path, renders):
    marker = tmp_path / "code_ran"
    out = tmp_path / "diffusion"
    out.mkdir()
    for name in ("latents.pt", "latents.safetensors"):
        (out / name).write_bytes(pickle.dumps(_Evil(marker)))
    gen = build_generator(TINY, seed=0)
    data = tg.prepare_generator_data(renders, 32, None, progress=False)
    config = DiffusionTrainConfig(max_steps=1, batch_size=4, probe_every=0)
    tg.train_diffusion(gen, data, out, config, progress=False)
    assert not marker.exists() and not (out / "latents.pt").exists()
    assert not (out / "latents.safetensors").exists()
    latents, masked = tg._cached_latents(gen, data, out / "latents")  # reused: the same key
    assert len(latents) == len(masked) == len(data)
    torch.testing.assert_close(latents[:], tg._latents(gen, data.images))
    meta = json.loads((out / "latents" / "meta.json").read_text())
    assert meta["key"]["encoder"] == tg._weights_digest(gen.vae.encoder)


def _forward(gen: AdGenerator, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    res, h = gen.resolution, gen.resolution // gen.vae_factor
    x = torch.randn(2, 9, h, h, generator=g)
    text = torch.randn(2, 24, gen.text_encoder.config.hidden_size, generator=g)
    ctrl = torch.rand(2, 3, res, res, generator=g)
    t = torch.tensor([700, 50])
    with torch.no_grad():
        down, mid = gen.controlnet(x[:, :4], t, encoder_hidden_states=text, controlnet_cond=ctrl,
                                   return_dict=False)  # fmt: skip
        return gen.unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]  # fmt: skip


def test_grow_from_adds_attention_levels_that_start_as_the_identity(tmp_path, renders):
    import dataclasses

    from rewardkit.training.generator import grow_from

    base = build_generator(TINY, seed=1)
    grown_arch = dataclasses.replace(TINY, cross_attention_levels=(True, True))
    grown = build_generator(grown_arch, seed=2)
    counts = grow_from(grown, base)
    assert counts["unet"]["added_blocks"] and counts["controlnet"]["added_blocks"]
    assert all(b.split(".")[1] == "0" for b in counts["unet"]["added_blocks"][:1])
    torch.testing.assert_close(_forward(grown), _forward(base), rtol=0, atol=0)
    # Without the zeroed output projections the added blocks would change the output.
    fresh = build_generator(grown_arch, seed=2)
    fresh.unet.load_state_dict(base.unet.state_dict(), strict=False)
    fresh.controlnet.load_state_dict(base.controlnet.state_dict(), strict=False)
    fresh.text_encoder = base.text_encoder
    assert not torch.allclose(_forward(fresh), _forward(base))
    # Another width is refused, naming what does not fit.
    wider = build_generator(dataclasses.replace(TINY, unet_channels=(16, 48)), seed=0)
    with pytest.raises(ValueError, match="another shape"):
        grow_from(wider, base)

    # Through train_generator: no VAE stage, a checkpoint that resumes, an export that loads.
    base_dir = base.save_pretrained(tmp_path / "base")
    diff = DiffusionTrainConfig(max_steps=2, batch_size=4, probe_every=0, checkpoint_every=1)
    vae = VAETrainConfig(max_steps=2, batch_size=4)
    summary = train_generator(renders, tmp_path / "run", grown_arch, vae, diff, progress=False,
                              init_from=base_dir)  # fmt: skip
    assert summary["vae"] == {"from": str(base_dir), "steps": 0}
    assert summary["diffusion"]["steps"] == 2
    out = AdGenerator.from_pretrained(tmp_path / "run" / "model")
    assert out.unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 2
    for name, value in base.vae.state_dict().items():
        assert torch.equal(value, out.vae.state_dict()[name])
    exported = AdGenerator.from_pretrained(tg.export_checkpoint(tmp_path / "run"))
    for name, value in exported.unet.state_dict().items():
        torch.testing.assert_close(value, out.unet.state_dict()[name])
    # Resuming the run under another architecture is refused, not continued.
    diff3 = dataclasses.replace(diff, max_steps=3)
    with pytest.raises(Exception, match="(?i)signature|differ|another"):
        train_generator(renders, tmp_path / "run", TINY, vae, diff3, progress=False,
                        init_from=base_dir)  # fmt: skip


@pytest.mark.parametrize("levels", ["4", "x", ","])
def test_cross_attention_flag_names_the_levels(tmp_path, renders, levels, capsys):
    rc = main(["train", "generator", "--manifest", str(renders), "--out", str(tmp_path / "o"),
               "--cross-attention", levels, "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--cross-attention" in err[0], err
    assert not (tmp_path / "o").exists()
