"""``rewardkit finetune``: RFFT from the command line (products, reward spec, replay, out)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rewardkit.generation.pipeline import generator_resolution
from rewardkit.io import (
    write_json_atomic,
    write_parquet_atomic,
)
from rewardkit.training.distributed import is_main_process, shared_accelerator
from rewardkit.training.generator import prepare_generator_data
from rewardkit.training.rfft.objectives import load_objective, parse_reward
from rewardkit.training.rfft.recipe import FinetuneConfig, finetune_generator, record_keys
from rewardkit.training.rfft.replay import (
    replay_source_key,
    reuse_replay,
    score_generated,
    select_replay,
)


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
    device: str = "cpu",
) -> dict:
    """``rewardkit finetune``: load products (a manifest or photo folder), the reward and the
    generator's sampler, then :func:`finetune_generator`. The probe set is ``probe``'s first
    ``probe_size`` products, or (without ``probe``) the last ``probe_size`` of ``products``,
    which are then left out of training. ``replay``: a manifest (or its folder) of images with
    ``product_path``, ``prompt`` and ``fill`` (a ``rewardkit generate`` output or a ``world
    render`` manifest); its images are scored by the reward and the best
    ``config.replay_top`` kept (``<out>/replay.parquet``, with the scores) as the replay set.
    ``device``: where the reward model scores the replay set; in training, each step moves
    the reward model and the generator's frozen parts beside the trained modules, which the
    training loop places (``config.mixed_precision`` is its autocast)."""
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
    objective = load_objective(kind, folder, views=config.reward_views).to(device)
    # The processes' group exists from here (the loop reuses this Accelerator), so the main
    # process alone can write the replay selection while the others wait for it.
    accelerator = shared_accelerator(config.mixed_precision, device)
    replay_data, replay_info = None, None
    if replay is not None:
        kept_file = Path(out) / "replay.parquet"
        replay_info = reuse_replay(kept_file, replay, reward, config.replay_top)
        if replay_info is None:  # first run (or other inputs): score and select
            scored = score_generated(replay, objective, gen_size)
            chosen = select_replay(scored, config.replay_top)
            replay_info = {
                "manifest": str(replay),
                "source": replay_source_key(replay),
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
            if is_main_process():
                Path(out).mkdir(parents=True, exist_ok=True)
                write_parquet_atomic(kept_file, chosen)
            accelerator.wait_for_everyone()
        replay_data = prepare_generator_data(kept_file, gen_size, None, False)
    summary = finetune_generator(
        generator, jobs, probe_jobs, objective, config, out, sampler_for(generator), progress,
        replay=replay_data,
    )  # fmt: skip
    summary["skipped_products"] = len(skipped)
    record_keys(Path(out) / "model", jobs, probe_jobs, kept_file if replay else None)
    if replay_info is not None:
        summary["replay"] = replay_info
        if is_main_process():
            write_json_atomic(Path(out) / "finetune_summary.json", summary)
    return summary
