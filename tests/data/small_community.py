"""A small simulated community for curation tests (no rendering: appearance is drawn)."""

import numpy as np
import pyarrow as pa

from rewardkit.world.appearance import FEATURE_NAMES
from rewardkit.world.community import CommunityConfig, CommunityLogs, simulate_community


def small_community(
    prompts: int = 20, per_prompt: int = 8, users: int = 1500, first_id: int = 0
) -> CommunityLogs:
    """``prompts`` x ``per_prompt`` images with random appearance, ``users`` users, seed 0."""
    rng = np.random.default_rng(0)
    n = prompts * per_prompt
    prompt_id = np.repeat(np.arange(prompts), per_prompt)
    images = pa.table({
        "image_id": np.arange(n, dtype=np.int64) + first_id,
        "prompt_id": prompt_id,
        "prompt": [f"prompt {p}" for p in prompt_id],
        "path": [f"images/{i}.png" for i in range(n)],
    })  # fmt: skip
    feats = np.tanh(rng.normal(0, 0.6, (n, len(FEATURE_NAMES)))).astype(np.float32)
    return simulate_community(images, feats, CommunityConfig(n_users=users, seed=0))
