"""RFFT: reward fine-tuning of the ad generator, with Consistent Condition regularisation.

One optimiser step (``../shared/MISSION.md``, Part B; the paper's section on RFFT):

1. A batch of products (photo, prompt, caption) and fresh seeds; a DDIM run of
   ``sample_steps`` steps (40) with the *fine-tuned* model, without gradients, up to a step
   ``t`` drawn at random among the last ``grad_window`` (10).
2. At ``t``, with gradients: the fine-tuned model's conditional and unconditional noise
   predictions ``eps(x_t, z, c)`` and ``eps(x_t, c)`` (``z`` the prompt, ``c`` the product's
   ControlNet and inpainting conditions), classifier-free guidance, and the one-step
   prediction ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, decoded by the VAE and
   pasted back around the product (what a judge sees).
3. The reward loss on that image: ``F_AC = -log P(Available)`` under RFNet (``rfnet``), or
   the negative Social Reward score (``social``).
4. The regulariser against the frozen reference model at the same ``x_t``:

   - ``cc``: ``L_CC = ||g_theta - g_ref||^2``, with ``g = -(eps(x_t, z, c) - eps(x_t, c)) /
     sqrt(1 - a_t)`` the implicit classifier's gradient ``grad log p(z | x_t, c)``: the
     direction the prompt pulls the sample in (squared L2, averaged over latent elements);
   - ``kl``: the KL divergence between the two models' one-step predictions
     ``p(x0_hat | x_t, z, c)``, Gaussians with a shared variance, i.e. up to that variance
     ``||x0_hat_theta - x0_hat_ref||^2`` (averaged over latent elements);
   - ``none``: nothing (ReFL-like).

   ``F_total = F + beta * L``.
5. Optionally (``replay``), ReFL's other half: the diffusion model's own denoising loss on a
   replay set of images the same reward ranks highest (:func:`select_replay`: the top
   ``replay_top`` of a manifest of images with their products and prompts: a ``rewardkit
   generate`` output, or the generator's own training renders, which the inspector judges
   far more reliably than generated images), so the fine-tuned model also learns the scenes
   the reward accepts from samples rather than only from the reward's gradient, which a weak
   inspector lets it satisfy with patterns it mistakes for a good layout.
   ``F_total = reward_weight * F + beta * L + replay_weight * L_denoise``.

Trainable part: the ControlNet (``controlnet``, as published), LoRA adapters (peft) on the
attention projections of the UNet and the ControlNet (``lora``), or every weight of both
(``all``: the most capacity, and a frozen copy of both as the reference; at the embedded
size that is 5.7 M weights). Everything else is frozen.
The loop is ``training.loop.run_training``: accelerate, AdamW, gradient clipping, checkpoints
with exact resume. Every step logs the reward loss, the regulariser and the reward; every
``probe_every`` steps a fixed probe set (products, prompts, seeds) is generated at the full
sampler and judged by the reward model and, when the products come from an AdWorld manifest,
by the oracle, with the background diversity and appeal (``generation.metrics``); the curves
go to ``curves.csv`` and ``curves.png`` in the run folder.

Output ``<out>/model``: a generator folder holding only the fine-tuned component(s) and a
``rewardkit_generator.json`` naming the base folder, which ``AdGenerator.from_pretrained``
(and so ``rewardkit generate``) loads as a whole pipeline.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from rewardkit.generation.pipeline import (
    AdGenerator,
    GenerationBatch,
    SamplerConfig,
    denoise,
    generate_images,
    generator_resolution,
    paste_back_tensor,
    predict,
    prepare_batch,
)
from rewardkit.generation.recurrent import (
    AVAILABLE,
    ProductJob,
    attempt_seed,
    products_on_white,
)
from rewardkit.io import (
    to_strict_json,
    write_folder_atomic,
    write_json_atomic,
    write_parquet_atomic,
)
from rewardkit.training.generator import (
    DenoisingSet,
    GeneratorData,
    _resolve,
    denoising_loss,
    prepare_generator_data,
)
from rewardkit.training.loop import TrainConfigBase, resumable, run_training

__all__ = [
    "FinetuneConfig",
    "RFNetObjective",
    "SocialObjective",
    "RFFTTrainee",
    "rfft_loss",
    "probe_generator",
    "finetune_generator",
    "finetune_command",
    "parse_reward",
    "score_generated",
    "select_replay",
]

REWARDS = ("rfnet", "social")
REGULARIZERS = ("cc", "kl", "none")
TRAINABLE = ("controlnet", "lora", "all")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class FinetuneConfig(TrainConfigBase):
    lr: float = 1e-4
    batch_size: int = 4
    epochs: int = 1000  # passes over the products; max_steps is the budget that binds
    max_steps: int | None = 200
    checkpoint_every: int = 25
    reward: str = "rfnet"  # rfnet | social
    regularizer: str = "cc"  # cc | kl | none
    beta: float = 1.0
    trainable: str = "controlnet"  # controlnet | lora | all (UNet and ControlNet, every weight)
    lora_rank: int = 8
    sample_steps: int | None = None  # DDIM steps of the run (None: the generator's, 40)
    guidance_scale: float | None = None  # None: the generator's
    grad_window: int = 10  # t is drawn among the last grad_window steps
    reward_views: int = 1  # RFNet: the image and reward_views - 1 jittered copies judged
    grad_checkpoint: bool = True  # recompute the grad step's activations in backward
    probe_every: int = 50  # steps between probes (0: only before and after)
    probe_size: int = 32
    reward_weight: float = 1.0  # 0 with regularizer none: the replay loss alone
    replay_weight: float = 1.0  # weight of the denoising loss on the replay set (if given)
    replay_batch: int = 8
    replay_top: float = 0.3  # share of the replay manifest kept, best by the reward

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (
            ("reward", REWARDS),
            ("regularizer", REGULARIZERS),
            ("trainable", TRAINABLE),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: one of {allowed}; got {getattr(self, name)!r}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0; got {self.beta}")
        if self.reward_views < 1:
            raise ValueError(f"reward_views: must be >= 1; got {self.reward_views}")
        if self.grad_window < 1:
            raise ValueError(f"grad_window: must be >= 1; got {self.grad_window}")
        if self.probe_every < 0 or self.probe_size < 1:
            raise ValueError("probe_every must be >= 0 and probe_size >= 1")
        if self.reward_weight < 0 or self.replay_weight < 0:
            raise ValueError("reward_weight and replay_weight: must be >= 0")
        if self.replay_batch < 1 or not 0 < self.replay_top <= 1:
            raise ValueError("replay_batch must be >= 1 and replay_top in (0, 1]")


# -- rewards -------------------------------------------------------------------------------


class RFNetObjective:
    """F_AC: cross-entropy towards Available under one or more RFNet inspectors (frozen).

    With several inspectors the loss is the mean of their ``-log P(Available)``; with
    ``views > 1`` each image is also judged in ``views - 1`` jittered copies (shifted by up to
    ``shift`` pixels, light noise) and the losses averaged. Both make the reward harder to
    satisfy with pixel patterns one network happens to like (reward hacking), at the cost of
    more inspector passes per step.
    """

    name = "rfnet"
    metric = "p_available"
    takes_rng = True

    def __init__(self, inspector, views: int = 1, shift: int = 2, noise: float = 0.02) -> None:
        inspectors = list(inspector) if isinstance(inspector, (list, tuple)) else [inspector]
        if not inspectors:
            raise ValueError("RFNetObjective: at least one inspector")
        if views < 1:
            raise ValueError(f"views: must be >= 1; got {views}")
        self.inspectors = [i.eval().requires_grad_(False) for i in inspectors]
        # Averaging needs one input size and one class order.
        kinds = {(int(i.rfnet.config.resolution), tuple(i.classes)) for i in self.inspectors}
        if len(kinds) != 1:
            raise ValueError(f"RFNet ensemble: inspectors differ in resolution or classes {kinds}")
        self.size, classes = kinds.pop()
        self.classes = list(classes)
        self.views, self.shift, self.noise = views, shift, noise
        self._products: dict[str, torch.Tensor] = {}

    def _product(self, job: ProductJob) -> torch.Tensor:
        # keyed by content: two folders may both hold a 000000.png
        if job.product_key not in self._products:
            self._products[job.product_key] = products_on_white([job.photo], self.size)[0]
        return self._products[job.product_key]

    def _inputs(self, images: torch.Tensor, jobs: list[ProductJob]):
        p = torch.stack([self._product(j) for j in jobs]).to(images.device, images.dtype)
        g = images
        if g.shape[-1] != self.size:
            g = F.interpolate(g, size=(self.size, self.size), mode="bilinear", antialias=True)
        return p, g

    def _jitter(self, g: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """A copy shifted by up to ``shift`` pixels (edges replicated) with light noise."""
        s = self.shift
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=rng))
        padded = F.pad(g, (s, s, s, s), mode="replicate")
        out = padded[..., s + dy : s + dy + g.shape[-2], s + dx : s + dx + g.shape[-1]]
        noise = torch.randn(g.shape, generator=rng, dtype=g.dtype).to(g.device)
        return (out + self.noise * noise).clamp(0, 1)

    def __call__(
        self, images: torch.Tensor, jobs: list[ProductJob], rng: torch.Generator | None = None
    ):
        p, g = self._inputs(images, jobs)
        captions = [j.caption for j in jobs]
        views = [g] + [self._jitter(g, rng) for _ in range(self.views - 1)]
        logp = torch.stack(
            [i.available_log_prob(p, v, captions) for i in self.inspectors for v in views]
        ).mean(0)
        return -logp, logp.exp()

    def classify(self, images: torch.Tensor, jobs: list[ProductJob]):
        """One forward without gradients: (verdicts, P(Available)) per image; an ensemble's
        class probabilities are averaged."""
        p, g = self._inputs(images, jobs)
        captions = [j.caption for j in jobs]
        with torch.no_grad():
            probs = torch.stack(
                [torch.softmax(i(p, g, captions), dim=-1) for i in self.inspectors]
            ).mean(0)
        classes = self.classes
        return [classes[k] for k in probs.argmax(-1).tolist()], probs[:, classes.index(AVAILABLE)]


class SocialObjective:
    """The negative Social Reward score of the image for its prompt (frozen model)."""

    name = "social"
    metric = "social_score"

    def __init__(self, model) -> None:
        self.model = model.eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor, jobs: list[ProductJob]):
        score = self.model(images, [j.prompt for j in jobs])
        return -score, score


def load_objective(kind: str, folder: str | Path | None, views: int = 1):
    """``rfnet`` (an inspector folder, or several joined by commas: an ensemble) or ``social``
    (a Social Reward folder); None: embedded. ``views``: jittered views per image (RFNet)."""
    from rewardkit.models.defaults import default_model_path

    if kind == "rfnet":
        from rewardkit.models.inspector import Inspector

        folders = [f for f in (folder or "").split(",") if f] or [default_model_path("rfnet")]
        return RFNetObjective([Inspector.from_pretrained(f) for f in folders], views=views)
    if kind == "social":
        from rewardkit.models.social_reward import SocialReward

        path = folder or default_model_path("social-reward")
        return SocialObjective(SocialReward.from_pretrained(path))
    raise ValueError(f"reward: one of {REWARDS}; got {kind!r}")


# -- the trainable part ---------------------------------------------------------------------


class RFFTTrainee(nn.Module):
    """The modules whose weights RFFT changes, and how to get the frozen reference."""

    def __init__(self, gen: AdGenerator, trainable: str, lora_rank: int = 8) -> None:
        super().__init__()
        self.kind = trainable
        for m in gen.modules():
            m.requires_grad_(False)
        if trainable in ("controlnet", "all"):
            # Frozen copies, kept in lists so that they are not submodules (not optimised,
            # not checkpointed).
            self.reference_controlnet = [copy.deepcopy(gen.controlnet).eval()]
            self.controlnet = gen.controlnet
            self.controlnet.requires_grad_(True)
            self.unet = None
            self.reference_unet = [None]
            if trainable == "all":
                self.reference_unet = [copy.deepcopy(gen.unet).eval()]
                self.unet = gen.unet
                self.unet.requires_grad_(True)
        else:
            from peft import LoraConfig

            cfg = LoraConfig(
                r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )  # fmt: skip
            gen.unet.add_adapter(cfg)
            gen.controlnet.add_adapter(cfg)
            self.unet, self.controlnet = gen.unet, gen.controlnet
            for name, p in [*gen.unet.named_parameters(), *gen.controlnet.named_parameters()]:
                p.requires_grad_("lora_" in name)

    @contextmanager
    def as_reference(self, gen: AdGenerator):
        """Within: the generator computes the frozen reference model."""
        if self.kind == "lora":
            gen.unet.disable_adapters()
            gen.controlnet.disable_adapters()
            try:
                yield None, None
            finally:
                gen.unet.enable_adapters()
                gen.controlnet.enable_adapters()
        else:
            yield self.reference_unet[0], self.reference_controlnet[0]

    def merged_components(self) -> dict[str, nn.Module]:
        """The fine-tuned components as plain diffusers models (LoRA fused and unloaded)."""
        if self.kind == "controlnet":
            return {"controlnet": self.controlnet}
        if self.kind == "all":
            return {"unet": self.unet, "controlnet": self.controlnet}
        out = {}
        for name, module in (("unet", self.unet), ("controlnet", self.controlnet)):
            m = copy.deepcopy(module)
            m.fuse_lora(lora_scale=1.0)
            m.unload_lora()
            out[name] = m
        return out


# -- one step ---------------------------------------------------------------------------------


def _eps_pair(gen, x, t, a_t, batch, sampler, unet, controlnet):
    """(eps(x_t, c), eps(x_t, z, c)): unconditional and prompt-conditioned, one doubled batch."""
    x2 = torch.cat([x, x])
    text = torch.cat([batch.uncond, batch.text])
    out = predict(gen, x2, t, batch, text, sampler.controlnet_scale, unet, controlnet)
    return gen.to_eps_x0(out, x2, a_t)[0].chunk(2)


def rfft_loss(
    gen: AdGenerator,
    trainee: RFFTTrainee,
    batch: GenerationBatch,
    jobs: list[ProductJob],
    objective,
    sampler: SamplerConfig,
    step_index: int,
    regularizer: str,
    beta: float,
    grad_checkpoint_step: bool = True,
    rng: torch.Generator | None = None,
    reward_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The module docstring's steps 1-4 for one batch: (F_total, logged values)."""
    steps = gen.timesteps(sampler.steps)
    t = steps[step_index]
    a_t = gen.alphas_cumprod()[t].to(batch.noise.dtype)
    with torch.no_grad():
        x_t = denoise(gen, batch, sampler, stop_before=step_index).latents
    w = sampler.guidance_scale

    def fine_tuned(x):
        eps_u, eps_c = _eps_pair(gen, x, t, a_t, batch, sampler, None, None)
        return eps_u, eps_c

    if grad_checkpoint_step:
        eps_u, eps_c = grad_checkpoint(fine_tuned, x_t, use_reentrant=False)
    else:
        eps_u, eps_c = fine_tuned(x_t)
    eps = eps_u + w * (eps_c - eps_u)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    images = paste_back_tensor(gen.decode_latents(x0), batch)
    # Objectives that draw random views take the step's generator (resume-exact).
    if getattr(objective, "takes_rng", False):
        reward_loss, reward = objective(images, jobs, rng)
    else:
        reward_loss, reward = objective(images, jobs)
    loss = reward_weight * reward_loss.mean()
    reg = torch.zeros((), dtype=loss.dtype)
    if regularizer != "none":
        with torch.no_grad(), trainee.as_reference(gen) as (unet_r, cn_r):
            ref_u, ref_c = _eps_pair(gen, x_t, t, a_t, batch, sampler, unet_r, cn_r)
        if regularizer == "cc":
            reg = ((eps_c - eps_u) - (ref_c - ref_u)).pow(2).mean() / (1 - a_t)
        else:  # kl
            ref_eps = ref_u + w * (ref_c - ref_u)
            ref_x0 = (x_t - (1 - a_t).sqrt() * ref_eps) / a_t.sqrt()
            reg = (x0 - ref_x0).pow(2).mean()
        loss = loss + beta * reg
    logs = {
        "reward_loss": float(reward_loss.mean().detach()),
        "regularizer": float(reg.detach()),
        "reward": float(reward.mean().detach()),
        "t": int(t),
    }
    return loss, logs


# -- probes -------------------------------------------------------------------------------------


def probe_generator(
    gen: AdGenerator,
    jobs: list[ProductJob],
    sampler: SamplerConfig,
    objective,
    seed: int = 0,
    oracle: bool = True,
    batch_size: int = 16,
) -> tuple[dict, list[np.ndarray]]:
    """Generate one image per probe job (fixed seeds) and measure it (module docstring)."""
    from rewardkit.generation.metrics import appeal_scores, background_diversity
    from rewardkit.world.oracle import label

    seeds = [attempt_seed(seed, i, 1) for i in range(len(jobs))]
    images = generate_images(
        gen, [j.prepared for j in jobs], [j.prompt for j in jobs], seeds, sampler, batch_size
    )
    t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    out: dict = {}
    if isinstance(objective, RFNetObjective):
        labels, reward = objective.classify(t, jobs)
        out["probe_rfnet_available"] = float(np.mean([lab == AVAILABLE for lab in labels]))
    else:
        with torch.no_grad():
            _, reward = objective(t, jobs)
    out[f"probe_{objective.metric}"] = float(reward.mean())
    if oracle and all(np.isfinite(j.height_cm) for j in jobs):
        verdicts = [
            label(j.photo, img, j.height_cm, fill=j.fill)[0]
            for j, img in zip(jobs, images, strict=True)
        ]
        out["probe_oracle_available"] = float(np.mean([v == AVAILABLE for v in verdicts]))
    appeal = appeal_scores(np.stack(images))
    out["probe_appeal"] = float(appeal["appeal"].mean())
    keep = np.stack([j.prepared.keep for j in jobs])
    div = background_diversity(np.stack(images)[:, None], keep)  # one seed per product
    out["probe_diversity_products"] = div["across_products"]
    return out, images


# -- replay set -----------------------------------------------------------------------------------


def _manifest_file(manifest: str | Path) -> Path:
    """A manifest given as its file or as the folder holding ``manifest.parquet``."""
    src = Path(manifest)
    return src / "manifest.parquet" if src.is_dir() else src


def score_generated(manifest: str | Path, objective, size: int, batch_size: int = 64) -> pa.Table:
    """The reward of every generated image of a ``rewardkit generate`` manifest (columns
    ``path`` for the image, ``product_path``, ``prompt``, ``fill``, optional ``caption`` and
    ``product_height_cm``; relative paths from the manifest's folder). Returns the readable
    rows with absolute paths and a ``reward`` column (RFNet: P(Available); Social Reward: its
    score); unreadable rows are left out and counted in the table's metadata ``skipped``."""
    from rewardkit.generation.run import load_jobs
    from rewardkit.io import read_image_rgb

    src = _manifest_file(manifest)
    table = pq.read_table(src)
    missing = [c for c in ("path", "product_path", "prompt", "fill") if c not in table.column_names]
    if missing:
        raise ValueError(f"{src}: a generated-image manifest needs columns {missing}")
    jobs, skipped = load_jobs(src, size)
    bad = {s["row"] for s in skipped}
    rows = [r for i, r in enumerate(table.to_pylist()) if i not in bad]
    keep_rows, keep_jobs, images = [], [], []
    for r, j in zip(rows, jobs, strict=True):
        p = _resolve(src.parent, r["path"])
        try:
            img = read_image_rgb(p)
        except (OSError, ValueError) as err:
            skipped.append({"path": str(p), "reason": str(err)})
            continue
        if img.shape[:2] != (size, size):
            skipped.append({"path": str(p), "reason": f"image is {img.shape[:2]}, not {size} px"})
            continue
        q = _resolve(src.parent, r["product_path"])
        r = {**r, "path": str(p.resolve()), "product_path": str(q.resolve())}
        keep_rows.append(r)
        keep_jobs.append(j)
        images.append(img)
    if not keep_rows:
        raise ValueError(f"{src}: no readable generated images ({len(skipped)} skipped)")
    rewards = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2)
        x = x.float() / 255
        js = keep_jobs[i : i + batch_size]
        if isinstance(objective, RFNetObjective):
            _, r = objective.classify(x, js)
        else:
            with torch.no_grad():
                _, r = objective(x, js)
        rewards.extend(float(v) for v in r)
    out = pa.Table.from_pylist(
        [{**r, "reward": v} for r, v in zip(keep_rows, rewards, strict=True)]
    )
    return out.replace_schema_metadata({"skipped": str(len(skipped))})


def select_replay(scored: pa.Table, top: float) -> pa.Table:
    """The best ``top`` share of ``scored`` by reward (at least one row), best first."""
    n = max(1, int(round(top * scored.num_rows)))
    order = np.argsort(-np.asarray(scored.column("reward").to_numpy(), dtype=float), kind="stable")
    return scored.take(order[:n])


# -- the recipe -----------------------------------------------------------------------------------


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if "reward_loss" in h]
    probes = [h for h in history if any(k.startswith("probe_") for k in h)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if steps:
        x = [h["step"] for h in steps]
        for ax, key in zip(axes[:2], ("reward", "regularizer"), strict=True):
            y = np.array([h[key] for h in steps], dtype=float)
            ax.plot(x, y, lw=0.6, alpha=0.4)
            k = max(1, len(y) // 20)
            smooth = np.convolve(y, np.ones(k) / k, mode="valid")
            ax.plot(x[k - 1 :], smooth, lw=1.8)
            ax.set_title(key)
            ax.set_xlabel("step")
    for key in ("probe_oracle_available", "probe_rfnet_available", "probe_social_score"):
        pts = [(h["step"], h[key]) for h in probes if key in h]
        if pts:
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=key.removeprefix("probe_"))
    axes[2].set_title("probe set")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write_curves(history: list[dict], out_dir: Path) -> None:
    keys: list[str] = []
    for h in history:
        keys.extend(k for k in h if k not in keys and not isinstance(h[k], dict))
    tmp = out_dir / "curves.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out_dir / "curves.csv")
    _plot_curves(history, out_dir / "curves.png")


def _save_model(
    trainee: RFFTTrainee,
    base: Path,
    folder: Path,
    card: dict,
    sampler: SamplerConfig,
    run_sampler: SamplerConfig,
) -> Path:
    """The fine-tuned component(s) and a ``rewardkit_generator.json`` naming ``base``. Its
    ``"sampler"`` is the base generator's recommended one, so ``generate`` samples the model as
    it would its base; the steps and guidance the fine-tune ran with are ``"finetune_sampler"``."""
    import shutil

    def write(tmp: Path) -> None:
        for name, module in trainee.merged_components().items():
            module.save_pretrained(tmp / name)
        if (base / "model_index.json").is_file():
            shutil.copy(base / "model_index.json", tmp / "model_index.json")
        rel = os.path.relpath(base.resolve(), folder.resolve())
        info = {
            "base": rel,
            "sampler": asdict(sampler),
            "finetune_sampler": asdict(run_sampler),
            "finetune": card,
        }
        (tmp / "rewardkit_generator.json").write_text(to_strict_json(info, indent=2) + "\n")

    return write_folder_atomic(folder, write)


def finetune_generator(
    generator: str | Path,
    train_jobs: list[ProductJob],
    probe_jobs: list[ProductJob],
    objective,
    config: FinetuneConfig,
    out_dir: str | Path,
    sampler: SamplerConfig,
    progress: bool = True,
    replay: GeneratorData | None = None,
) -> dict:
    """RFFT (module docstring). Returns the run summary (also ``train_summary.json``).
    ``sampler``: the base generator's recommended sampler (``sampler_for(generator)``); the
    run uses it with ``config.sample_steps`` / ``config.guidance_scale`` where given, and the
    saved model recommends it unchanged. ``replay``: generated images the reward ranks
    highest (:func:`select_replay`), whose denoising loss is added with
    ``config.replay_weight``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = Path(generator)
    gen = AdGenerator.from_pretrained(base)
    recommended = sampler  # the base's; the model card keeps it (not the run's steps)
    sampler = SamplerConfig(
        steps=config.sample_steps or sampler.steps,
        guidance_scale=(
            sampler.guidance_scale if config.guidance_scale is None else config.guidance_scale
        ),
        controlnet_scale=sampler.controlnet_scale,
        blend=sampler.blend,
        negative_prompt=sampler.negative_prompt,
    )
    if config.grad_window > sampler.steps:
        raise ValueError(f"grad_window {config.grad_window} > sample steps {sampler.steps}")
    if len(train_jobs) < config.batch_size:
        raise ValueError(f"{len(train_jobs)} training products < batch size {config.batch_size}")
    use_reward = config.reward_weight > 0 or config.regularizer != "none"
    if not use_reward and replay is None:
        raise ValueError("reward_weight 0 without a regulariser trains only on a replay set")
    torch.manual_seed(config.seed)
    trainee = RFFTTrainee(gen, config.trainable, config.lora_rank)
    signature = {
        "config": resumable(config),
        "generator": str(base.resolve()),
        "train_products": [j.product_id for j in train_jobs[:8]] + [len(train_jobs)],
    }
    dset = None
    if replay is not None:
        if replay.images.shape[-1] != generator_resolution(base):
            raise ValueError("replay images must be at the generator's resolution")
        dset = DenoisingSet.build(gen, replay)
        signature["replay"] = replay.fingerprint

    def probe(step: int) -> dict:
        for m in gen.modules():
            m.eval()
        t0 = time.perf_counter()
        res, _ = probe_generator(gen, probe_jobs, sampler, objective, seed=config.seed + 7)
        res["probe_seconds"] = round(time.perf_counter() - t0, 1)
        return res

    last: dict = {}

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        idx = rows.tolist()
        jobs = [train_jobs[i] for i in idx]
        # Seeds and the step t are functions of the rows (and the run's seed): resume-exact.
        key = int(np.random.SeedSequence([config.seed, *idx]).generate_state(1)[0])
        rng = np.random.default_rng(key)
        seeds = [attempt_seed(config.seed, i, int(rng.integers(1 << 30))) for i in idx]
        step_index = sampler.steps - 1 - int(rng.integers(config.grad_window))
        loss, logs = torch.zeros(()), {}
        if use_reward:
            batch = prepare_batch(
                gen, [j.prepared for j in jobs], [j.prompt for j in jobs], seeds,
                sampler.negative_prompt,
            )  # fmt: skip
            loss, logs = rfft_loss(
                gen, trainee, batch, jobs, objective, sampler, step_index,
                config.regularizer, config.beta, config.grad_checkpoint,
                torch.Generator().manual_seed(key), config.reward_weight,
            )  # fmt: skip
        if dset is not None:
            g = torch.Generator().manual_seed(key + 1)
            picks = torch.randint(len(dset), (config.replay_batch,), generator=g)
            replay_loss = denoising_loss(gen, dset, picks, g)
            loss = loss + config.replay_weight * replay_loss
            logs["replay_loss"] = float(replay_loss.detach())
        last.clear()
        last.update(logs)
        return loss

    def after_step(step: int) -> dict:
        entry = dict(last)
        if config.probe_every and step % config.probe_every == 0:
            entry.update(probe(step))
        return entry

    # Probe the base model once (step 0), unless resuming a run that already did.
    state_file = out_dir / "probe0.json"
    if state_file.is_file():
        base_probe = json.loads(state_file.read_text())
    else:
        base_probe = probe(0)
        write_json_atomic(state_file, base_probe)

    card = {k: v for k, v in asdict(config).items()}
    result = run_training(
        trainee,
        len(train_jobs),
        step_loss,
        config,
        out_dir,
        signature,
        evaluate=None,
        save_model=lambda folder: _save_model(trainee, base, folder, card, recommended, sampler),
        progress=progress,
        after_step=after_step,
    )
    history = [{"step": 0, **base_probe}, *result.history]
    final = history[-1]
    if not any(k.startswith("probe_") for k in final):
        final_probe = probe(result.steps)
        history.append({"step": result.steps, **final_probe})
    _write_curves(history, out_dir)
    probes = [h for h in history if any(k.startswith("probe_") for k in h)]
    summary = {
        "out_dir": str(out_dir),
        "model": str(out_dir / "model"),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "seconds_per_step": (round(result.seconds / max(1, result.steps - result.resumed_from), 2)),
        "config": asdict(config),
        "sampler": asdict(sampler),
        "probe_before": probes[0],
        "probe_after": probes[-1],
        "curves": str(out_dir / "curves.csv"),
    }
    write_json_atomic(out_dir / "finetune_summary.json", summary)
    return summary


def _record_keys(model_dir: Path, jobs, probe_jobs, replay_file: Path | None) -> None:
    """Beside the fine-tuned model: the products and prompts it trained on (and the replay
    set's), and the probe products it was watched on (selection). The base generator's keys
    are inherited through the ``base`` the model names."""
    from rewardkit.data.keys import (
        TrainingKeys,
        height_from_row,
        product_keys_of_paths,
        write_training_keys,
    )
    from rewardkit.training.generator import _resolve

    seen = TrainingKeys()
    for role, group in (("train", jobs), ("selection", probe_jobs)):
        seen.add("product", (j.product_key for j in group), role)
        seen.add_prompts((j.prompt for j in group), role)
    if replay_file is not None:
        rows = pq.read_table(replay_file).to_pylist()
        paths = [_resolve(replay_file.parent, r["product_path"]) for r in rows]
        seen.add("product", product_keys_of_paths(paths, [height_from_row(r) for r in rows]),
                 "train")  # fmt: skip
        seen.add_prompts((r.get("prompt") for r in rows), "train")
    write_training_keys(model_dir, seen)


def _source_key(manifest: str | Path) -> dict:
    """What identifies a replay source: its resolved manifest file, size and mtime."""
    src = _manifest_file(manifest)
    st = src.stat()
    return {"path": str(src.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _reuse_replay(kept_file: Path, manifest, reward: str, top: float) -> dict | None:
    """The selection a previous start of this run wrote to ``kept_file``, when it came from the
    same source file, reward and share (scoring a large manifest again would cost minutes on
    every resume); else None."""
    if not kept_file.is_file():
        return None
    meta = pq.read_schema(kept_file).metadata or {}
    raw = meta.get(b"rewardkit_replay")
    if raw is None:
        return None
    info = json.loads(raw)
    same = (
        info.get("source") == _source_key(manifest)
        and info.get("reward_spec") == reward
        and info.get("replay_top") == top
    )
    return info if same else None


def parse_reward(spec: str) -> tuple[str, str | None]:
    """``rfnet``, ``social``, ``rfnet:DIR[,DIR...]`` or ``social:DIR`` -> (kind, folder(s) or
    None)."""
    kind, _, folder = spec.partition(":")
    if kind not in REWARDS:
        raise ValueError(f"--reward: expected rfnet[:DIR[,DIR...]] or social[:DIR]; got {spec!r}")
    return kind, folder or None


def finetune_command(
    generator: str | Path,
    reward: str,
    products: str | Path,
    out: str | Path,
    config: FinetuneConfig,
    probe: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    replay: str | Path | None = None,
) -> dict:
    """``rewardkit finetune``: load products (a manifest or photo folder), the reward and the
    generator's sampler, then :func:`finetune_generator`. The probe set is ``probe``'s first
    ``probe_size`` products, or (without ``probe``) the last ``probe_size`` of ``products``,
    which are then left out of training. ``replay``: a manifest (or its folder) of images with
    ``product_path``, ``prompt`` and ``fill`` (a ``rewardkit generate`` output or a ``world
    render`` manifest); its images are scored by the reward and the best
    ``config.replay_top`` kept (``<out>/replay.parquet``, with the scores) as the replay set."""
    from rewardkit.generation.run import load_jobs, sampler_for

    kind, folder = parse_reward(reward)
    if kind != config.reward:
        config = FinetuneConfig(**{**asdict(config), "reward": kind})
    gen_size = generator_resolution(generator)
    jobs, skipped = load_jobs(products, gen_size, limit=limit)
    if probe is not None:
        probe_jobs, _ = load_jobs(probe, gen_size, limit=config.probe_size)
    else:
        if len(jobs) <= config.probe_size:
            raise ValueError(
                f"{products}: {len(jobs)} products; need more than probe_size "
                f"{config.probe_size} to hold a probe set out (or give --probe)"
            )
        jobs, probe_jobs = jobs[: -config.probe_size], jobs[-config.probe_size :]
    objective = load_objective(kind, folder, views=config.reward_views)
    replay_data, replay_info = None, None
    if replay is not None:
        kept_file = Path(out) / "replay.parquet"
        replay_info = _reuse_replay(kept_file, replay, reward, config.replay_top)
        if replay_info is None:  # first run (or other inputs): score and select
            scored = score_generated(replay, objective, gen_size)
            chosen = select_replay(scored, config.replay_top)
            replay_info = {
                "manifest": str(replay),
                "source": _source_key(replay),
                "reward_spec": reward,
                "replay_top": config.replay_top,
                "scored": scored.num_rows,
                "skipped": int((scored.schema.metadata or {}).get(b"skipped", b"0")),
                "kept": chosen.num_rows,
                "reward_threshold": float(np.min(chosen.column("reward").to_numpy())),
                "reward_mean_all": float(np.mean(scored.column("reward").to_numpy())),
                "reward_mean_kept": float(np.mean(chosen.column("reward").to_numpy())),
            }
            chosen = chosen.replace_schema_metadata({"rewardkit_replay": json.dumps(replay_info)})
            Path(out).mkdir(parents=True, exist_ok=True)
            write_parquet_atomic(kept_file, chosen)
        replay_data = prepare_generator_data(kept_file, gen_size, None, False)
    summary = finetune_generator(
        generator, jobs, probe_jobs, objective, config, out, sampler_for(generator), progress,
        replay=replay_data,
    )  # fmt: skip
    summary["skipped_products"] = len(skipped)
    _record_keys(Path(out) / "model", jobs, probe_jobs, kept_file if replay else None)
    if replay_info is not None:
        summary["replay"] = replay_info
        write_json_atomic(Path(out) / "finetune_summary.json", summary)
    return summary
