"""Side-by-side comparison of scorers on a community's held-out prompts (the paper's Table 4).

``compare_scorers`` scores every image the evaluation needs once per scorer (the images of
the held-out pairs and, when the community has a ground truth, every image of the held-out
prompts), then hands the score tables to :func:`rewardkit.evaluation.evaluate_scores`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from rewardkit.data.keys import check_held_out
from rewardkit.evaluation import EvalTable, evaluate_scores
from rewardkit.models.scorers import Scorer
from rewardkit.training.loop import load_images, read_table

__all__ = ["compare_scorers", "community_images", "score_images_in_memory"]


def community_images(community: str | Path) -> pa.Table:
    """The image table of a community folder: image_id, prompt_id, prompt, path (relative to
    the folder), from ``images.parquet`` (or ``pool.parquet`` when it lacks paths)."""
    root = Path(community)
    table = read_table(root / "images.parquet", ["image_id", "prompt_id", "prompt"])
    if "path" not in table.column_names:
        pool = read_table(root / "pool.parquet", ["image_id", "path"])
        table = table.join(pool.select(["image_id", "path"]), "image_id")
    return table.select(["image_id", "prompt_id", "prompt", "path"])


@torch.no_grad()
def score_images_in_memory(
    scorer: Scorer, images: torch.Tensor, prompts: list[str], batch_size: int = 64
) -> torch.Tensor:
    """Scores (N,) of uint8 images (N, 3, H, W), decoded once and shared by every scorer."""
    out = [
        scorer.score_batch(images[i : i + batch_size].float() / 255, prompts[i : i + batch_size])
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def compare_scorers(
    scorers: Mapping[str, Scorer],
    community: str | Path,
    pairs: str | Path | None = None,
    split: str | None = "test",
    k: int = 1,
    batch_size: int = 64,
    progress: bool = True,
    models: Mapping[str, str | Path | None] | None = None,
    allow_overlap: bool = False,
) -> tuple[EvalTable, dict[str, pa.Table]]:
    """Evaluate scorers on a community's held-out prompts.

    Args:
        scorers: display name -> scorer (the shared reward signature).
        community: A community folder (``images.parquet``, optionally ``truth/images.parquet``).
        pairs: Curated pairs (``rewardkit curate`` output) whose ``split`` marks the held-out
            prompts; None evaluates against the truth on every prompt.
        split: The held-out split.
        k: The k of the top-k hit rate.
        batch_size: Images per forward pass.
        progress: Show a progress bar over scorers.
        models: display name -> model folder, for the held-out check: evaluated prompts that
            a model trained or was chosen on raise ``OverlapError`` unless ``allow_overlap``
            (the overlap is kept in the table's ``held_out``).
        allow_overlap: Report the overlap instead of refusing it.

    Returns:
        The :class:`EvalTable` and, per scorer, its score table (image_id, prompt_id, score).
    """
    root = Path(community)
    images = community_images(root)
    truth_path = root / "truth" / "images.parquet"
    truth = None
    if truth_path.is_file():
        truth = read_table(truth_path, ["image_id", "prompt_id", "appeal"])
    pair_table = None
    if pairs is not None:
        pair_table = read_table(Path(pairs), ["pos_image_id", "neg_image_id", "prompt_id"])
        held = pair_table
        if split is not None:
            if "split" not in pair_table.column_names:
                raise ValueError(f"{pairs}: missing column 'split' (or pass split=None)")
            held = pair_table.filter(pc.equal(pair_table["split"], split))
        prompt_ids = pc.unique(held["prompt_id"])
        needed = pc.is_in(images["prompt_id"], value_set=prompt_ids)
        if truth is None:  # only the images of the pairs
            ids = pa.concat_arrays(
                [held["pos_image_id"].combine_chunks(), held["neg_image_id"].combine_chunks()]
            )
            needed = pc.is_in(images["image_id"], value_set=pc.unique(ids))
        images = images.filter(needed)
    elif truth is None:
        raise ValueError(f"{root}: no truth/images.parquet and no pairs: nothing to evaluate")
    if images.num_rows == 0:
        raise ValueError(f"{root}: no images of the held-out prompts (split {split!r})")
    prompts = [str(p) for p in images["prompt"].to_pylist()]
    held_out = None
    if models is not None:
        held_out = check_held_out(
            models,
            prompts=sorted(set(prompts)),
            kind="prompt",
            allow_overlap=allow_overlap,
            where=str(root),
        )
    pixels = load_images(images["path"].to_pylist(), root)  # (N, 3, H, W) uint8
    score_tables = {}
    for name, scorer in tqdm(scorers.items(), desc="scorers", disable=not progress):
        s = score_images_in_memory(scorer, pixels, prompts, batch_size)
        score_tables[name] = pa.table(
            {
                "image_id": images["image_id"],
                "prompt_id": images["prompt_id"],
                "score": pa.array(s.numpy(), pa.float32()),
            }
        )
    table = evaluate_scores(score_tables, truth, pair_table, split=split, k=k)
    table.held_out = held_out
    return table, score_tables
