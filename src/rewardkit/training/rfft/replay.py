"""ReFL's other half for RFFT: a replay set of images the reward ranks best.

:func:`score_generated` scores a manifest of images with products and prompts,
:func:`select_replay` keeps the best share; a resumed run reuses the selection
(:func:`reuse_replay`) when its source file, reward and share are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from rewardkit.training.generator import _resolve
from rewardkit.training.rfft.objectives import RFNetObjective


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


def replay_source_key(manifest: str | Path) -> dict:
    """What identifies a replay source: its resolved manifest file, size and mtime."""
    src = _manifest_file(manifest)
    st = src.stat()
    return {"path": str(src.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def reuse_replay(kept_file: Path, manifest, reward: str, top: float) -> dict | None:
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
        info.get("source") == replay_source_key(manifest)
        and info.get("reward_spec") == reward
        and info.get("replay_top") == top
    )
    return info if same else None
