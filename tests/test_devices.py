"""One device for everything a step touches, checked without a GPU; the CLI's device flags.

The models go to the ``meta`` device (a stand-in for ``cuda``: no data, real device checks)
and every aten op of the step runs under :class:`OneDevice`, which refuses an op that mixes
a device tensor with a CPU tensor of one or more dimensions (the mixes CUDA refuses; CPU
scalars and CPU indices are allowed there, so here too). Meta kernels alone miss some mixes
(an embedding with CPU ids, a convolution with a CPU input run on the CPU), the mode does
not. So a tensor a step creates on the CPU (noise, masks, token ids, cached products) or a
frozen module left there (a reference copy, the VAE, a reward model) fails these tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rewardkit.cli import main
from rewardkit.generation.pipeline import (
    AdGenerator,
    SamplerConfig,
    denoise,
    paste_back_tensor,
    prepare_batch,
)
from rewardkit.generation.product import prepare_product
from rewardkit.generation.recurrent import ProductJob
from tests.generation.conftest import TINY, product_photo

DEVICE = torch.device("meta")
_MOVES = {  # ops that legitimately take tensors from two devices
    torch.ops.aten.copy_.default,
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
}


_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class OneDevice(TorchDispatchMode):
    """Refuse every op whose tensors sit on two devices (module docstring); count ops.

    A meta tensor has no values: where code reads one (input checks such as "no empty
    caption mask", transformers' "is the mask all ones") it reads 0 / False, and a result
    brought back to the CPU (validation figures) is zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if func in _READS and args[0].device == DEVICE:
            return torch.zeros((), dtype=args[0].dtype).item()  # 0, 0.0 or False
        if (
            func is torch.ops.aten._to_copy.default
            and args[0].device == DEVICE
            and torch.device(kwargs.get("device") or DEVICE).type == "cpu"
        ):  # results brought back (validation figures): zeros of their shape
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func not in _MOVES:
            flat, _ = tree_flatten((args, kwargs))
            devices = {
                t.device.type
                for t in flat
                if isinstance(t, torch.Tensor) and (t.dim() > 0 or t.device.type != "cpu")
            }
            if len(devices) > 1:
                raise RuntimeError(f"{func}: tensors on {sorted(devices)} in one op")
        return func(*args, **kwargs)


def _on(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()} | {b.device.type for b in module.buffers()}


@pytest.fixture(scope="module")
def generator() -> AdGenerator:
    from rewardkit.generation.default import build_generator

    return build_generator(TINY, seed=0)


def _copy(gen: AdGenerator) -> AdGenerator:
    nets = (copy.deepcopy(m) for m in gen.modules())
    return AdGenerator(*nets, gen.tokenizer, gen.scheduler)


def _jobs(size: int, n: int = 2) -> list[ProductJob]:
    photos = [product_photo(s) for s in range(n)]
    return [
        ProductJob(f"p{i}", p, prepare_product(p, size), "a mug on a wooden table",
                   "mug, 10 cm", 10.0, 0.4)
        for i, p in enumerate(photos)
    ]  # fmt: skip


def test_the_check_catches_what_meta_kernels_miss():
    with OneDevice():
        emb = torch.nn.Embedding(5, 3).to(DEVICE)
        with pytest.raises(RuntimeError, match="two devices|in one op"):
            emb(torch.tensor([1, 2]))  # CPU token ids
        conv = torch.nn.Conv2d(3, 3, 1).to(DEVICE)
        with pytest.raises(RuntimeError, match="in one op"):
            conv(torch.ones(1, 3, 4, 4))  # a CPU input
        ok = torch.ones(2, 3, device=DEVICE) * torch.tensor(2.0)  # CPU scalars are fine
    assert ok.device == DEVICE


def test_a_generation_step_stays_on_the_device(generator):
    """prepare_batch (text, masks, product latents, noise), the loop with CFG, ControlNet and
    the product blend, decoding and the paste-back: all on the generator's device."""
    gen = _copy(generator).to(DEVICE)
    jobs = _jobs(gen.resolution)
    with OneDevice() as mode, torch.no_grad():
        batch = prepare_batch(gen, [j.prepared for j in jobs], [j.prompt for j in jobs], [1, 2])
        latents = denoise(gen, batch, SamplerConfig(steps=2, guidance_scale=2.0)).latents
        images = paste_back_tensor(gen.decode_latents(latents), batch)
    assert mode.ops > 100
    assert {v.device for v in vars(batch).values()} == {DEVICE}
    assert latents.device == images.device == DEVICE and latents.dtype == torch.float32


@pytest.fixture(scope="module")
def inspector():
    """A tiny inspector with every input: DPT depth, spectral-residual saliency, a BERT
    caption encoder (MiniLM's tokenizer)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rewardkit.models.inspector import Inspector
    from rewardkit.models.modalities import (
        CaptionEncoder,
        DepthEstimator,
        SpectralResidualSaliency,
        _minilm_path,
    )
    from rewardkit.models.rfnet import RFNet
    from tests.models.test_modalities import tiny_depth_config
    from tests.models.test_rfnet import tiny_config

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path())
    bert = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
    )  # fmt: skip
    return Inspector(
        RFNet(tiny_config()).eval(),
        depth=DepthEstimator.from_config(tiny_depth_config(), seed=1),
        saliency=SpectralResidualSaliency(size=32),
        caption=CaptionEncoder(BertModel(bert), tokenizer),
    ).eval()


def test_an_inspector_forward_stays_on_the_device(inspector):
    """Inputs from the CPU (as a command reads them) go to the inspector's device; depth,
    saliency, caption tokens and RFNet all run there."""
    insp = copy.deepcopy(inspector).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    product, generated = (
        torch.rand(2, 3, 40, 40, generator=g),
        torch.rand(2, 3, 40, 40, generator=g),
    )
    with OneDevice(), torch.no_grad():
        logits = insp(product, generated, ["mug, 10 cm", "lamp, 30 cm"])
    assert logits.device == DEVICE and logits.shape == (2, len(insp.classes))


@pytest.fixture(scope="module")
def scorer_folders(tmp_path_factory):
    from rewardkit.models.scorers import AestheticPredictor
    from tests.models.test_social_reward import make_tiny_clip, make_tiny_vtde

    root = tmp_path_factory.mktemp("scorers")
    clip = make_tiny_clip(root / "clip")
    vtde = make_tiny_vtde(root / "vtde", pooling="mean")
    AestheticPredictor.from_backbone(clip, head_kind="laion-mlp").save_pretrained(root / "laion")
    return {"social-reward": vtde, "pickscore": clip, "laion-aesthetic": root / "laion"}


@pytest.mark.parametrize("name", ["social-reward", "pickscore", "laion-aesthetic"])
def test_a_scorer_forward_stays_on_the_device(scorer_folders, name):
    from rewardkit.models.scorers import create_scorer

    scorer = create_scorer(name, scorer_folders[name], device=DEVICE)
    assert _on(scorer) == {"meta"}
    images = torch.rand(3, 3, 48, 36, generator=torch.Generator().manual_seed(1))
    with OneDevice(), torch.no_grad():
        scores = scorer(images, ["a red shoe", "a red shoe", "blue bag"])  # a repeated prompt
    assert scores.device == DEVICE and scores.shape == (3,)


class _Social:
    """A Social Reward objective on the tiny dual encoder (loaded on the CPU)."""

    def __new__(cls, folder):
        from rewardkit.models.social_reward import SocialReward
        from rewardkit.training.rfft import SocialObjective

        return SocialObjective(SocialReward.from_pretrained(folder))


@pytest.mark.parametrize(
    ("trainable", "regularizer", "reward"),
    [("controlnet", "cc", "rfnet"), ("all", "kl", "social")],
)
def test_an_rfft_step_moves_every_frozen_part_beside_the_trainee(
    generator, inspector, scorer_folders, trainable, regularizer, reward
):
    """As accelerate does, only the trainee is on the device; the batch was prepared on the
    CPU (where the rest of the generator was). The step moves the UNet or ControlNet, VAE,
    text encoder, reference copies, the reward model and its cached products, and the batch."""
    from rewardkit.training.rfft import RFFTTrainee, RFNetObjective
    from rewardkit.training.rfft.step import rfft_terms

    gen = _copy(generator)
    trainee = RFFTTrainee(gen, trainable)
    jobs = _jobs(gen.resolution)
    if reward == "rfnet":  # two views: the jitter's noise is drawn on the CPU, then moved
        objective = RFNetObjective(copy.deepcopy(inspector), views=2)
        objective._product(jobs[0])  # a product cached on the CPU before the move
    else:
        objective = _Social(scorer_folders["social-reward"])
    batch = prepare_batch(gen, [j.prepared for j in jobs], [j.prompt for j in jobs], [1, 2])
    trainee.to(DEVICE)
    with OneDevice() as mode:
        loss, terms = rfft_terms(
            gen, trainee, batch, jobs, objective, SamplerConfig(steps=3, guidance_scale=2.0),
            2, regularizer, 1.0, rng=torch.Generator().manual_seed(0),
        )  # fmt: skip
    assert mode.ops > 100 and loss.device == DEVICE
    assert all(v.device == DEVICE for v in terms.values() if isinstance(v, torch.Tensor))
    frozen = [*gen.modules(), *trainee.reference_controlnet, *trainee.reference_unet]
    assert all(_on(m) == {"meta"} for m in frozen if m is not None)
    if reward == "rfnet":
        assert all(_on(i) == {"meta"} for i in objective.inspectors)
        assert {p.device for p in objective._products.values()} == {DEVICE}
    else:
        assert _on(objective.model) == {"meta"}


# -- the CLI --------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--products", "P", "--out", "OUT/gen", "--prompt", "x"],
        ["inspect", "--input", "IN", "--out", "OUT/v.parquet"],
        ["train", "reward", "--pairs", "P.parquet", "--out", "OUT/run"],
        ["finetune", "--products", "P", "--out", "OUT/run"],
        ["eval", "generator", "--products", "P", "--out", "OUT/eval"],
        ["demo", "--out", "OUT/demo"],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_device_cuda_without_cuda_is_one_line_and_exit_2(argv, tmp_path, capsys):
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    assert main([*argv, "--device", "cuda", "--mixed-precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda" in err[0] and "CUDA is not available" in err[0]
    assert not any(tmp_path.iterdir())  # refused before any work


def test_every_model_command_takes_the_flags():
    from rewardkit.cli import build_parser

    parser = build_parser()
    commands = [
        ["generate", "--products", "P", "--out", "O"],
        ["inspect", "--input", "I", "--out", "O"],
        ["score", "--input", "I", "--out", "O"],
        ["eval", "reward", "--community", "C"],
        ["eval", "rfnet", "--manifest", "M"],
        ["eval", "generator", "--products", "P", "--out", "O"],
        ["train", "reward", "--pairs", "P", "--out", "O"],
        ["train", "contrastive", "--manifest", "M", "--out", "O"],
        ["train", "rfnet", "--manifest", "M", "--out", "O"],
        ["train", "generator", "--manifest", "M", "--out", "O"],
        ["finetune", "--products", "P", "--out", "O"],
        ["demo", "--out", "O"],
    ]
    for argv in commands:
        a = parser.parse_args([*argv, "--device", "cpu", "--mixed-precision", "fp16"])
        assert (a.device, a.mixed_precision) == ("cpu", "fp16"), argv
        a = parser.parse_args(argv)
        assert (a.device, a.mixed_precision) == (None, None), argv  # resolved in main
    with pytest.raises(SystemExit):
        parser.parse_args([*commands[0], "--mixed-precision", "fp8"])


def test_training_configs_take_the_precision_and_a_device_field_when_they_have_one():
    import dataclasses

    from rewardkit.commands.devices import for_training
    from rewardkit.training.reward import RewardTrainConfig

    config = RewardTrainConfig(mixed_precision="fp16")
    assert for_training(config, "cpu", None).mixed_precision == "fp16"  # the YAML's kept
    assert for_training(config, "cpu", "bf16").mixed_precision == "bf16"

    @dataclasses.dataclass
    class WithDevice:
        mixed_precision: str = "no"
        device: str | None = None

    placed = for_training(WithDevice(), "cuda:1", "bf16")
    assert (placed.device, placed.mixed_precision) == ("cuda:1", "bf16")
    with pytest.raises(ValueError, match="mixed precision"):
        for_training(config, "cpu", "fp8")


def test_generate_in_bf16_end_to_end_on_the_cpu(generator, tmp_path):
    """``--mixed-precision bf16``: the generator's weights in bf16, the loop's arithmetic in
    fp32, images written; default ``--device`` on this machine is the CPU."""
    import json

    import numpy as np

    from rewardkit.io import read_image_rgb, write_png_atomic

    gen_dir = generator.save_pretrained(tmp_path / "gen")
    for i in range(2):
        write_png_atomic(tmp_path / "products" / f"item{i}.png", product_photo(i))
    out = tmp_path / "out"
    rc = main([
        "generate", "--generator", str(gen_dir), "--products", str(tmp_path / "products"),
        "--out", str(out), "--prompt", "a mug on a table", "--steps", "3", "--no-progress",
        "--mixed-precision", "bf16",
    ])  # fmt: skip
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["mixed_precision"] == "bf16" and stats["products"] == 2
    assert stats["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    image = read_image_rgb(out / "images" / "item0.png")
    assert image.shape == (TINY.resolution, TINY.resolution, 3) and np.ptp(image) > 0


# -- training steps: the recipes' own code, one step on the device ---------------------------


class MetaAccelerator:
    """What the loop asks of accelerate, with ``meta`` as the device: ``prepare`` moves the
    trained module there, as accelerate does on a GPU (and nothing else). It is not the main
    process, so the loop writes no checkpoint or model (meta weights have no values)."""

    device = DEVICE
    num_processes, process_index, is_main_process = 1, 0, False

    def prepare(self, *objects):
        return tuple(o.to(DEVICE) if isinstance(o, torch.nn.Module) else o for o in objects)

    def backward(self, loss):
        loss.backward()

    def no_sync(self, module):
        import contextlib

        return contextlib.nullcontext()

    def clip_grad_norm_(self, params, norm):
        return torch.nn.utils.clip_grad_norm_(params, norm)

    def wait_for_everyone(self):
        pass

    def free_memory(self):
        pass


@pytest.fixture
def on_meta(monkeypatch):
    """Training runs with :class:`MetaAccelerator` under :class:`OneDevice`."""
    import rewardkit.training.generator as generator_module
    import rewardkit.training.loop as loop

    accelerator = MetaAccelerator()
    monkeypatch.setattr(loop, "shared_accelerator", lambda *a, **k: accelerator)
    monkeypatch.setattr(generator_module, "shared_accelerator", lambda *a, **k: accelerator)
    return OneDevice


def test_a_reward_training_step_stays_on_the_device(on_meta, tmp_path):
    """train reward: the rows the loader fetched (decoded images, on the CPU), the cached
    text states and the weights all meet on the device."""
    from rewardkit.training.reward import RewardTrainConfig, train_reward
    from tests.models.test_social_reward import make_tiny_clip
    from tests.training.test_reward_recipes import _pairs_dataset

    model, pairs = make_tiny_clip(tmp_path / "clip"), _pairs_dataset(tmp_path / "data", 8, 16)
    config = RewardTrainConfig(preset="paper", lr=1e-3, batch_size=4, max_steps=1)
    with on_meta() as mode:
        result = train_reward(model, pairs, tmp_path / "run", config, progress=False)
    assert result.steps == 1 and mode.ops > 100


def test_an_rfnet_training_step_stays_on_the_device(on_meta, world, tmp_path):
    """train rfnet: the five inputs read from the store (and the degraded copy), labels and
    class weights on the device."""
    import yaml

    from rewardkit.commands.rfnet import train_rfnet_command
    from rewardkit.training.rfnet import RFNetTrainConfig
    from tests.training.test_rfnet_recipe import TINY

    (tmp_path / "rfnet.yaml").write_text(yaml.safe_dump(TINY))
    config = RFNetTrainConfig(epochs=1, batch_size=8, max_steps=1, lr=1e-3, degrade=0.5)
    manifest = world / "w" / "manifest.parquet"
    with on_meta() as mode:  # the store is prepared on the CPU, the step runs on the device
        summary = train_rfnet_command(manifest, tmp_path / "run", config, tmp_path / "rfnet.yaml",
                                      maps="truth", progress=False)  # fmt: skip
    assert summary["runs"]["full"]["steps"] == 1
    assert mode.ops > 100


def test_a_generator_training_step_stays_on_the_device(on_meta, generator, tmp_path):
    """train generator's diffusion stage (one step and a probe generation) and finetune's
    replay loss (denoising_loss): the frozen VAE, cached latents, masks, token ids, Canny
    controls and the noise, timesteps and prompt dropout drawn on the CPU all meet the UNet,
    ControlNet and text encoder (and their EMA copies) on the device."""
    from rewardkit.training.generator import (
        DenoisingSet,
        DiffusionTrainConfig,
        Probe,
        denoising_loss,
        prepare_generator_data,
        train_diffusion,
    )
    from rewardkit.world.export import render_world

    render_world(tmp_path / "w", 4, seed=2, size=TINY.resolution, progress=False)
    manifest = tmp_path / "w" / "manifest.parquet"
    data = prepare_generator_data(manifest, TINY.resolution, progress=False)
    probe = Probe.from_manifest(manifest, TINY.resolution, 2)
    config = DiffusionTrainConfig(batch_size=2, max_steps=1, probe_every=1, probe_steps=2)
    gen = _copy(generator)
    with on_meta() as mode:
        figures = train_diffusion(gen, data, tmp_path / "run", config, probe, progress=False)
    assert figures["steps"] == 1 and len(figures["probes"]) == 1 and mode.ops > 1000
    assert all(_on(m) == {"meta"} for m in gen.modules())

    gen = _copy(generator)
    dset = DenoisingSet.build(gen, data)  # on the CPU, as finetune builds its replay set
    for m in (gen.unet, gen.controlnet, gen.text_encoder):
        m.to(DEVICE)
    with on_meta() as mode:
        rng = [torch.Generator().manual_seed(i) for i in range(3)]
        loss = denoising_loss(gen, dset, torch.tensor([0, 2, 3]), rng)
        loss.backward()
    assert loss.device == DEVICE and mode.ops > 100
