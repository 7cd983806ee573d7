"""`rewardkit train generator` on a handful of renders: both stages run, resume, and the
result loads as a pipeline folder."""

import json

import pytest
import torch

from rewardkit.cli import main
from rewardkit.generation.pipeline import AdGenerator
from rewardkit.training.generator import (
    DiffusionTrainConfig,
    VAETrainConfig,
    train_generator,
)
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
