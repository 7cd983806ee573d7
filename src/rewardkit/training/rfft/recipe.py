"""The RFFT recipe: configuration, probes, curves, the training loop and the saved model."""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from rewardkit.generation.pipeline import (
    AdGenerator,
    SamplerConfig,
    generate_images,
    generator_resolution,
    prepare_batch,
)
from rewardkit.generation.recurrent import (
    AVAILABLE,
    ProductJob,
    attempt_seed,
)
from rewardkit.io import (
    to_strict_json,
    write_folder_atomic,
    write_json_atomic,
)
from rewardkit.training.generator import (
    DenoisingSet,
    GeneratorData,
    _resolve,
    denoising_loss,
)
from rewardkit.training.loop import (
    MicroBatch,
    TrainConfigBase,
    is_main_process,
    keyed_generator,
    keyed_seed,
    mean_over_processes,
    on_main,
    resumable,
    run_training,
    shared_accelerator,
)
from rewardkit.training.rfft.objectives import REWARDS, RFNetObjective
from rewardkit.training.rfft.regularizers import REGULARIZERS
from rewardkit.training.rfft.step import TRAINABLE, RFFTTrainee, rfft_loss


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
    kl_beta: float = 0.0  # with regularizer cc: a KL term of this weight beside it
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
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta: must be >= 0; got {self.kl_beta}")
        if self.kl_beta > 0 and self.regularizer != "cc":
            raise ValueError(
                f"kl_beta: a KL term beside Consistent Condition, so only with regularizer cc; "
                f"got regularizer {self.regularizer!r} (use it with beta for KL alone)"
            )
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
    shared_accelerator(config.mixed_precision)  # under a launcher: join the process group
    with torch.random.fork_rng(devices=[]):  # seeded LoRA init; the caller's RNG kept
        torch.default_generator.manual_seed(config.seed)
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

    parts: list[dict] = []  # the logged values of this step's micro-batches

    def step_loss(rows: torch.Tensor, micro: MicroBatch) -> torch.Tensor:
        idx = rows.tolist()
        jobs = [train_jobs[i] for i in idx]
        # The step t is drawn per step and each product's seed per (step, product): the same
        # in one process or several (each process generates its own products), and a resumed
        # run draws what the uninterrupted one did.
        step_key = keyed_seed(config.seed, micro.step)
        seeds = [attempt_seed(config.seed, i, keyed_seed(step_key, i) % (1 << 30)) for i in idx]
        step_index = sampler.steps - 1 - keyed_seed(step_key, -1) % config.grad_window
        key = keyed_seed(step_key, -2, micro.index)  # jittered reward views: per part
        loss, logs = torch.zeros(()), {}
        if use_reward:
            batch = prepare_batch(
                gen, [j.prepared for j in jobs], [j.prompt for j in jobs], seeds,
                sampler.negative_prompt,
            )  # fmt: skip
            loss, logs = rfft_loss(
                gen, trainee, batch, jobs, objective, sampler, step_index,
                config.regularizer, config.beta, config.grad_checkpoint,
                keyed_generator(key), config.reward_weight, config.kl_beta,
            )  # fmt: skip
        if dset is not None:
            # replay_batch picks per step, shared out among the step's parts; a part's mean
            # counts by its share of them, so the parts average to the mean over all picks.
            g = keyed_generator(step_key, -3)
            picks = torch.randint(len(dset), (config.replay_batch,), generator=g)
            mine = torch.arange(config.replay_batch)[micro.index :: micro.count]
            if len(mine):
                gens = [keyed_generator(step_key, -4, int(j)) for j in mine]
                replay_loss = denoising_loss(gen, dset, picks[mine], gens)
                share = len(mine) * micro.count / config.replay_batch
                loss = loss + config.replay_weight * share * replay_loss
                logs["replay_loss"] = float(replay_loss.detach())
        parts.append(logs)
        return loss

    def after_step(step: int) -> dict:
        # This process's micro-batches averaged, then averaged over the processes.
        keys = sorted({k for p in parts for k in p if k != "t"})
        entry = {k: float(np.mean([p[k] for p in parts if k in p])) for k in keys}
        entry = mean_over_processes(entry)
        if parts and "t" in parts[0]:
            entry["t"] = parts[0]["t"]  # drawn per step: the same everywhere
        parts.clear()
        if config.probe_every and step % config.probe_every == 0:
            entry.update(on_main(lambda: probe(step)))
        return entry

    # Probe the base model once (step 0), unless resuming a run that already did.
    state_file = out_dir / "probe0.json"
    if state_file.is_file():
        base_probe = json.loads(state_file.read_text())
    else:
        base_probe = on_main(lambda: probe(0))
        if is_main_process():
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
        final_probe = on_main(lambda: probe(result.steps))
        history.append({"step": result.steps, **final_probe})
    if is_main_process():
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
    if is_main_process():
        write_json_atomic(out_dir / "finetune_summary.json", summary)
    return summary


def record_keys(model_dir: Path, jobs, probe_jobs, replay_file: Path | None) -> None:
    """Beside the fine-tuned model: the products and prompts it trained on (and the replay
    set's), and the probe products it was watched on (selection). The base generator's keys
    are inherited through the ``base`` the model names. The main process alone writes."""
    if not is_main_process():
        return
    from rewardkit.data.keys import (
        TrainingKeys,
        height_from_row,
        product_keys_of_paths,
        write_training_keys,
    )

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
