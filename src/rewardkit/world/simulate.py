"""One call from nothing to a community folder: render the pool, measure it, simulate, write.

``simulate_pool`` + ``community_summary`` is what ``rewardkit world community`` runs.
Output folder::

    images/...            the pool's images (PNG)
    pool.parquet          image_id, prompt_id, prompt, path, label (render truth class)
    users.parquet, images.parquet, events/, truth/, schema.md   (see world.community)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc

from rewardkit.io import write_parquet_atomic
from rewardkit.world.appearance import appearance_features
from rewardkit.world.community import (
    CommunityConfig,
    CommunityLogs,
    pairwise_truth_agreement,
    simulate_community,
)
from rewardkit.world.community_io import write_community
from rewardkit.world.pool import render_pool


def simulate_pool(
    out_dir: str | Path,
    users: int,
    seed: int = 0,
    prompts: int = 100,
    images_per_prompt: int = 12,
    size: int = 64,
    events: int | None = None,
    progress: bool = True,
) -> CommunityLogs:
    """Render a pool of ``prompts`` x ``images_per_prompt`` images, simulate ``users``
    reacting to it, and write pool and logs to ``out_dir``."""
    out = Path(out_dir)
    pool, pixels = render_pool(out, prompts, images_per_prompt, seed, size, progress)
    write_parquet_atomic(out / "pool.parquet", pool)
    features = appearance_features(pixels)
    config = CommunityConfig(n_users=users, events_target=events, seed=seed)
    logs = simulate_community(
        pool.select(["image_id", "prompt_id", "prompt", "path"]), features, config
    )
    write_community(logs, out)
    return logs


def community_summary(logs: CommunityLogs, out_dir: str | Path) -> dict:
    vc = pc.value_counts(logs.events.column("event_type")).to_pylist()
    counts = {str(d["values"]): int(d["counts"]) for d in vc}
    return {
        "out": str(out_dir),
        "users": logs.users.num_rows,
        "images": logs.images.num_rows,
        "events": logs.events.num_rows,
        "events_by_type": counts,
        "pairwise_truth_agreement": pairwise_truth_agreement(logs),
    }
