"""Recurrent Generation: regenerate the products whose image fails inspection, in batches.

A queue holds (product, attempt) jobs. Each batch takes the next jobs from the queue; after
the judge's verdicts, a failing product goes back to the end of the queue with a new seed
until it passes or has used ``max_attempts``. So every batch stays full (new products and
retries side by side) instead of looping over one product at a time. The seed of attempt k
of product i is a function of (seed, i, k) only, so the images do not depend on how batches
were formed (the per-product loop in ``benchmarks/bench_recurrent.py`` makes the same ones).

Judges share one call: ``judge(images [B, 3, H, W] in [0, 1], prompts, **context) ->
(labels, scores)``; an image is accepted when its label is ``Available``. ``OracleJudge``
(AdWorld's ground truth, for measurement) and ``InspectorJudge`` (RFNet) implement it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rewardkit.generation.pipeline import AdGenerator, SamplerConfig, generate_images
from rewardkit.generation.product import PreparedProduct

__all__ = [
    "ProductJob",
    "Attempt",
    "RecurrentResult",
    "OracleJudge",
    "InspectorJudge",
    "attempt_seed",
    "recurrent_generate",
    "refill_order",
    "available_rate_after",
    "judge_images",
    "products_on_white",
]

AVAILABLE = "Available"


@dataclass
class ProductJob:
    """One product to generate for: its photo (RGBA), prompt, caption and real height.

    ``product_id`` names its output files (unique within a run); ``product_key`` is its
    content identity (``rewardkit.data.keys.product_key``, computed when not given)."""

    product_id: str
    photo: np.ndarray  # RGBA uint8
    prepared: PreparedProduct
    prompt: str
    caption: str
    height_cm: float
    fill: float
    product_key: str = ""

    def __post_init__(self) -> None:
        if not self.product_key:
            from rewardkit.data.keys import product_key

            self.product_key = product_key(self.photo, self.height_cm)


@dataclass
class Attempt:
    product: int  # index into the jobs
    attempt: int  # 1-based
    seed: int
    image: np.ndarray  # RGB uint8, product pasted back
    label: str
    score: float

    @property
    def accepted(self) -> bool:
        return self.label == AVAILABLE


@dataclass
class RecurrentResult:
    attempts: list[Attempt]
    final: list[Attempt]  # one per product: the accepted attempt, or the best-scoring one
    max_attempts: int
    seconds: float
    batches: int
    images_generated: int = field(init=False)

    def __post_init__(self) -> None:
        self.images_generated = len(self.attempts)

    @property
    def accepted(self) -> int:
        return sum(a.accepted for a in self.final)

    def stats(self) -> dict:
        n = len(self.final)
        acc = [a for a in self.final if a.accepted]
        return {
            "products": n,
            "accepted": len(acc),
            "accepted_rate": len(acc) / n if n else 0.0,
            "first_attempt_rate": available_rate_after(self, 1),
            "rate_after_attempts": {
                k: available_rate_after(self, k) for k in range(1, self.max_attempts + 1)
            },
            "mean_attempts_per_accepted": (
                float(np.mean([a.attempt for a in acc])) if acc else float("nan")
            ),
            "images_generated": self.images_generated,
            "seconds": round(self.seconds, 2),
            "accepted_per_second": len(acc) / self.seconds if self.seconds else 0.0,
            "batches": self.batches,
        }


def available_rate_after(result: RecurrentResult, k: int) -> float:
    """Share of products with an accepted image within their first ``k`` attempts."""
    n = len(result.final)
    return sum(a.accepted and a.attempt <= k for a in result.final) / n if n else 0.0


def attempt_seed(seed: int, product: int, attempt: int) -> int:
    return int(np.random.SeedSequence([seed, product, attempt]).generate_state(1)[0])


Judge = Callable[..., tuple[list[str], torch.Tensor]]


class OracleJudge:
    """AdWorld's oracle as a judge: label from pixels, score 1 for Available else 0."""

    name = "oracle"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context):
        from rewardkit.world.oracle import label

        arr = (images.detach().float().permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(
            np.uint8
        )
        labels = [
            label(photo, img, h, fill=f)[0]
            for img, photo, h, f in zip(
                arr, context["photos"], context["heights"], context["fills"], strict=True
            )
        ]
        scores = torch.tensor([1.0 if lab == AVAILABLE else 0.0 for lab in labels])
        return labels, scores


class InspectorJudge:
    """An RFNet inspector as a judge: its verdict (at the model's operating point: the most
    probable class, or Available when P(Available) >= its ``accept_threshold``), score
    P(Available). ``threshold``: the loop's own operating point instead of the model's
    (Available when P(Available) >= it): a stricter accept test costs attempts and buys
    precision, without changing how ``inspect`` labels images. None: the model's
    ``loop_threshold`` when its config has one, else its operating point."""

    name = "inspector"

    def __init__(self, inspector, threshold: float | None = None) -> None:
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"--accept-threshold: must be in (0, 1); got {threshold}")
        self.inspector = inspector.eval()
        self.threshold = (
            threshold if threshold is not None else inspector.rfnet.config.loop_accept_threshold
        )

    @classmethod
    def at_operating_point(cls, inspector) -> InspectorJudge:
        """The judge that labels as ``inspect`` does (the model's operating point, never its
        ``loop_threshold``): for reports of how many images the inspector calls Available."""
        judge = cls(inspector)
        judge.threshold = inspector.accept_threshold  # the Inspector's own operating point
        return judge

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], **context):
        size = self.inspector.rfnet.config.resolution
        device = self.inspector.device
        p = products_on_white(context["photos"], size).to(device)
        g = images.to(device).float()
        if g.shape[-1] != size:
            g = torch.nn.functional.interpolate(g, size=(size, size), mode="bilinear")
        extra = ()
        if self.inspector.uses_placement:  # early fusion: where the product sits, its height
            extra = self.inspector.placement_inputs(
                context["photos"], context["fills"], context["heights"]
            )
        with torch.no_grad():
            logits = self.inspector(p, g, list(context["captions"]), *extra)
            probs = torch.softmax(logits, dim=-1)
        classes = self.inspector.classes
        return self.inspector.verdicts(probs, self.threshold), probs[:, classes.index(AVAILABLE)]


def products_on_white(photos: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """RFNet's product input: RGBA photos composited on white, resized, (B, 3, S, S) in [0, 1]."""
    from PIL import Image

    out = []
    for photo in photos:
        im = Image.fromarray(photo, "RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, im).convert("RGB")
        out.append(np.asarray(rgb.resize((size, size), Image.BILINEAR)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def judge_images(judge: Judge, images: list[np.ndarray], jobs: list[ProductJob]):
    """Judge RGB uint8 images of the given jobs: (labels, scores)."""
    t = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return judge(
        t,
        [j.prompt for j in jobs],
        photos=[j.photo for j in jobs],
        captions=[j.caption for j in jobs],
        heights=[j.height_cm for j in jobs],
        fills=[j.fill for j in jobs],
    )


def recurrent_generate(
    gen: AdGenerator,
    jobs: Sequence[ProductJob],
    judge: Judge,
    config: SamplerConfig | None = None,
    max_attempts: int = 8,
    batch_size: int = 16,
    seed: int = 0,
    refill: bool = True,
    progress: Callable[[int, int], None] | None = None,
    indices: Sequence[int] | None = None,
) -> RecurrentResult:
    """Generate until each product has an accepted image or used ``max_attempts``.

    Args:
        refill: True: batches mix new products and retries (the queue above). False: one
            product at a time, retried until done (the naive loop, for comparison).
        progress: called with (products finished, products) after every batch.
        indices: each job's index in the whole run, which its seeds are drawn from
            (default: its position in ``jobs``). A shard of a larger run (``generate
            --engine ray``) passes its products' run indices, so it paints the images the
            whole run paints. ``Attempt.product`` stays the position in ``jobs``.
    """
    config = config if config is not None else SamplerConfig()
    if max_attempts < 1:
        raise ValueError(f"max_attempts: must be >= 1; got {max_attempts}")
    if not jobs:
        raise ValueError("no products to generate for")
    run_index = list(range(len(jobs))) if indices is None else [int(x) for x in indices]
    if len(run_index) != len(jobs):
        raise ValueError(f"indices: {len(run_index)} for {len(jobs)} jobs")
    start = time.perf_counter()
    queue: deque[tuple[int, int]] = deque((i, 1) for i in range(len(jobs)))
    attempts: list[Attempt] = []
    best: dict[int, Attempt] = {}
    done: set[int] = set()
    batches = 0
    while queue:
        if refill:
            take = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        else:
            take = [queue.popleft()]
        idx = [i for i, _ in take]
        seeds = [attempt_seed(seed, run_index[i], k) for i, k in take]
        batch_jobs = [jobs[i] for i in idx]
        images = generate_images(
            gen,
            [j.prepared for j in batch_jobs],
            [j.prompt for j in batch_jobs],
            seeds,
            config,
            batch_size=len(take),
        )
        labels, scores = judge_images(judge, images, batch_jobs)
        batches += 1
        retry = []
        for (i, k), s, img, lab, sc in zip(
            take, seeds, images, labels, scores.tolist(), strict=True
        ):
            a = Attempt(product=i, attempt=k, seed=s, image=img, label=lab, score=float(sc))
            attempts.append(a)
            if i not in best or a.accepted or (not best[i].accepted and sc > best[i].score):
                best[i] = a
            if a.accepted or k >= max_attempts:
                done.add(i)
            else:
                retry.append((i, k + 1))
        if refill:
            queue.extend(retry)
        else:
            for r in reversed(retry):
                queue.appendleft(r)
        if progress is not None:
            progress(len(done), len(jobs))
    final = [best[i] for i in range(len(jobs))]
    return RecurrentResult(
        attempts=attempts,
        final=final,
        max_attempts=max_attempts,
        seconds=time.perf_counter() - start,
        batches=batches,
    )


def refill_order(
    attempts_used: Sequence[int], batch_size: int
) -> tuple[list[tuple[int, int]], int]:
    """The (product, attempt) pairs in the order :func:`recurrent_generate` (``refill``)
    makes them when product ``i`` uses ``attempts_used[i]`` attempts, and its number of
    batches: the same queue without the model. A sharded run lays out its attempts with it
    as one run would have logged them."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1; got {batch_size}")
    queue: deque[tuple[int, int]] = deque((i, 1) for i in range(len(attempts_used)))
    order: list[tuple[int, int]] = []
    batches = 0
    while queue:
        take = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
        order.extend(take)
        batches += 1
        queue.extend((i, k + 1) for i, k in take if k < attempts_used[i])
    return order, batches


def replay_loop(scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """What Recurrent Generation does at ``threshold`` for products whose every attempt was
    painted and judged: ``scores`` is (products, max_attempts), attempts in order. The loop
    stops at the first attempt with score >= threshold, else returns the best-scoring one
    (the first of equal scores), as :func:`recurrent_generate` does. Returns (the returned
    attempt's 0-based index, attempts painted) per product."""
    scores = np.asarray(scores)
    passed = scores >= threshold
    any_pass = passed.any(1)
    first = passed.argmax(1)
    pick = np.where(any_pass, first, scores.argmax(1))
    return pick, np.where(any_pass, first + 1, scores.shape[1])


def replay_outcome(scores: np.ndarray, available: np.ndarray, threshold: float) -> dict:
    """:func:`replay_loop` scored with reference labels ``available`` (the same grid): the
    share of products whose returned image is Available and the mean attempts painted."""
    pick, used = replay_loop(scores, threshold)
    ok = np.asarray(available)[np.arange(len(pick)), pick]
    return {"threshold": threshold, "available_rate": float(ok.mean()),
            "mean_attempts": float(used.mean())}  # fmt: skip


def choose_loop_threshold(
    scores: np.ndarray, available: np.ndarray, candidates: Sequence[float] | None = None
) -> dict:
    """Recurrent Generation's accept threshold, chosen on a validation run that painted every
    attempt (``generate --until-accepted --accept-threshold 0.99999``) and had each labelled
    (the oracle here, annotators elsewhere): the threshold whose replay
    (:func:`replay_loop`) returns a reference-Available image for the most products, the
    fewest attempts among ties. ``candidates``: thresholds to try (default: the midpoints
    between consecutive distinct scores, which give every behaviour there is). Returns
    ``{"loop_threshold", "available_rate", "mean_attempts", "products", "max_attempts"}``."""
    scores = np.asarray(scores, dtype=np.float64)
    available = np.asarray(available, dtype=bool)
    if scores.ndim != 2 or scores.shape != available.shape or scores.size == 0:
        raise ValueError(
            f"scores {scores.shape} and labels {available.shape}: need one (products, "
            "attempts) grid for both"
        )
    if candidates is None:
        distinct = np.unique(scores)
        grid = (distinct[:-1] + distinct[1:]) / 2
    else:
        grid = np.asarray(candidates, np.float64)
    grid = grid[(grid > 0.0) & (grid < 1.0)]
    if grid.size == 0:
        raise ValueError("no threshold in (0, 1) to choose from")
    outcomes = [replay_outcome(scores, available, float(t)) for t in grid]
    best = max(outcomes, key=lambda o: (o["available_rate"], -o["mean_attempts"]))  # first of ties
    return {"loop_threshold": best["threshold"], "available_rate": best["available_rate"],
            "mean_attempts": best["mean_attempts"], "products": int(scores.shape[0]),
            "max_attempts": int(scores.shape[1])}  # fmt: skip


def attempt_grid(attempts, labels: Sequence[str | None], max_attempts: int) -> tuple:
    """(scores, available, product ids) as (products, max_attempts) grids from a run's
    ``attempts.parquet`` rows (dicts with ``product_id``, ``attempt``, ``score``) and each
    row's reference label. Products without all ``max_attempts`` judged and labelled
    attempts are left out and counted: ``(scores, available, ids, left_out)``."""
    by: dict[str, dict[int, tuple[float, bool]]] = {}
    for row, lab in zip(attempts, labels, strict=True):
        if lab is None or row["score"] is None:
            continue
        by.setdefault(str(row["product_id"]), {})[int(row["attempt"])] = (
            float(row["score"]), lab == AVAILABLE
        )  # fmt: skip
    keep = [p for p, a in by.items() if all(k in a for k in range(1, max_attempts + 1))]
    ids = sorted(keep)
    scores = np.array([[by[p][k][0] for k in range(1, max_attempts + 1)] for p in ids])
    available = np.array([[by[p][k][1] for k in range(1, max_attempts + 1)] for p in ids])
    return scores, available, ids, len(by) - len(keep)
