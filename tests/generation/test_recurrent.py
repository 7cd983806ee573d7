"""Recurrent Generation: batches refill with failing products; the loop and the CLI."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rewardkit.cli import main
from rewardkit.generation.pipeline import SamplerConfig
from rewardkit.generation.product import prepare_product
from rewardkit.generation.recurrent import (
    ProductJob,
    attempt_grid,
    attempt_seed,
    choose_loop_threshold,
    recurrent_generate,
    refill_order,
    replay_loop,
)
from rewardkit.io import write_png_atomic

FAST = SamplerConfig(steps=2, guidance_scale=1.0)


class SeedJudge:
    """Accepts an attempt when its seed is divisible by 3 (about a third pass), deterministic."""

    name = "seed"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images, prompts, **context):
        self.calls.append(images.shape[0])
        means = images.mean(dim=(1, 2, 3))
        labels = ["Available" if s % 3 == 0 else "Space Mismatch" for s in context["seeds"]]
        return labels, means


def _jobs(gen, photos, n):
    return [
        ProductJob(f"p{i}", photos[i % len(photos)], prepare_product(photos[i % len(photos)],
                   gen.resolution), "a mug on a table", "mug, 10 cm", 10.0, 0.4)
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture()
def seed_judge(monkeypatch):
    """Pass the attempt seeds to the judge as context (the real judges do not need them)."""
    import rewardkit.generation.recurrent as rec

    judge = SeedJudge()
    original = rec.judge_images
    seeds_of: dict[int, int] = {}

    def judge_batch(j, images, jobs):
        return j(
            torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255,
            [x.prompt for x in jobs],
            seeds=[seeds_of[id(img)] for img in images],
        )

    orig_generate = rec.generate_images

    def generate(gen, products, prompts, seeds, config, batch_size):
        out = orig_generate(gen, products, prompts, seeds, config, batch_size)
        for img, s in zip(out, seeds, strict=True):
            seeds_of[id(img)] = s
        return out

    monkeypatch.setattr(rec, "judge_images", judge_batch)
    monkeypatch.setattr(rec, "generate_images", generate)
    yield judge
    monkeypatch.setattr(rec, "judge_images", original)


def test_refill_keeps_batches_full_and_matches_the_per_product_loop(
    tiny_generator, photos, seed_judge
):
    jobs = _jobs(tiny_generator, photos, 7)
    batched = recurrent_generate(tiny_generator, jobs, seed_judge, FAST, max_attempts=4,
                                 batch_size=4, seed=1)  # fmt: skip
    calls_batched = list(seed_judge.calls)
    seed_judge.calls.clear()
    single = recurrent_generate(tiny_generator, jobs, seed_judge, FAST, max_attempts=4,
                                batch_size=4, seed=1, refill=False)  # fmt: skip
    assert set(seed_judge.calls) == {1}
    # Same attempts, same seeds, same verdicts: only the batching differs.
    key = lambda r: sorted((a.product, a.attempt, a.seed, a.label) for a in r.attempts)  # noqa: E731
    assert key(batched) == key(single)
    assert batched.batches < single.batches
    # Batches are full while the queue holds enough jobs: only the tail runs short.
    assert sum(calls_batched) == len(batched.attempts) and calls_batched[0] == 4
    assert batched.batches <= -(-len(batched.attempts) // 4) + 4
    for a in batched.final:
        tries = [b for b in batched.attempts if b.product == a.product]
        if a.accepted:
            assert a.seed % 3 == 0 and a.attempt == max(b.attempt for b in tries)
        else:
            assert len(tries) == 4  # budget spent: the best-scoring attempt is returned
            assert a.score == max(b.score for b in tries)
        assert all(b.seed == attempt_seed(1, b.product, b.attempt) for b in tries)
    stats = batched.stats()
    rates = list(stats["rate_after_attempts"].values())
    assert rates == sorted(rates) and rates[-1] == stats["accepted_rate"]
    # The queue replayed from the attempts each product used: the same order and batches
    # (how generate --engine ray lays out its shards' attempts).
    used = [max(b.attempt for b in batched.attempts if b.product == i) for i in range(7)]
    order, batches = refill_order(used, 4)
    assert order == [(a.product, a.attempt) for a in batched.attempts]
    assert batches == batched.batches


def test_run_indices_give_a_shard_the_whole_runs_seeds(tiny_generator, photos, seed_judge):
    jobs = _jobs(tiny_generator, photos, 5)
    whole = recurrent_generate(tiny_generator, jobs, seed_judge, FAST, max_attempts=3,
                               batch_size=2, seed=4)  # fmt: skip
    shard = recurrent_generate(tiny_generator, jobs[3:], seed_judge, FAST, max_attempts=3,
                               batch_size=2, seed=4, indices=[3, 4])  # fmt: skip
    mine = {(a.product + 3, a.attempt): a for a in shard.attempts}
    theirs = {(a.product, a.attempt): a for a in whole.attempts if a.product >= 3}
    assert mine.keys() == theirs.keys()
    for key, a in mine.items():
        assert a.seed == theirs[key].seed and a.label == theirs[key].label
        np.testing.assert_allclose(a.image.astype(int), theirs[key].image.astype(int), atol=1)


def test_generate_cli_until_accepted_with_the_oracle(tmp_path, tiny_generator, photos):
    gen_dir = tiny_generator.save_pretrained(tmp_path / "gen")
    products = tmp_path / "products"
    for i, p in enumerate(photos):
        write_png_atomic(products / f"item{i}.png", p)
    (products / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    rc = main([
        "generate", "--generator", str(gen_dir), "--products", str(products), "--out", str(out),
        "--prompt", "a mug on a table, in front of a sage wall", "--until-accepted",
        "--judge", "oracle", "--max-attempts", "2", "--steps", "2", "--no-progress",
    ])  # fmt: skip
    # No size in a plain folder: the oracle cannot judge size, so the command says so.
    assert rc == 2
    (tmp_path / "prompts.txt").write_text("a mug on a table\n")
    import pyarrow as pa

    manifest = tmp_path / "products.parquet"
    paths = [str(products / f"item{i}.png") for i in range(3)] + [str(products / "broken.png")]
    pq.write_table(pa.table({"product_path": paths, "caption": ["mug, 10 cm"] * 4}), manifest)
    rc = main([
        "generate", "--generator", str(gen_dir), "--products", str(manifest), "--out", str(out),
        "--prompts", str(tmp_path / "prompts.txt"), "--until-accepted", "--judge", "oracle",
        "--max-attempts", "2", "--steps", "2", "--batch-size", "2", "--no-progress",
    ])  # fmt: skip
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["products"] == 3 and len(stats["skipped"]) == 1
    assert stats["accept_threshold"] is None  # the oracle judges: no operating point
    # The loop's own operating point is the inspector's: refused with the oracle, in one line.
    rc = main([
        "generate", "--generator", str(gen_dir), "--products", str(manifest), "--out",
        str(tmp_path / "refused"), "--until-accepted", "--judge", "oracle",
        "--accept-threshold", "0.9", "--steps", "2", "--no-progress",
    ])  # fmt: skip
    assert rc == 2 and not (tmp_path / "refused" / "manifest.parquet").exists()
    final = pq.read_table(out / "manifest.parquet").to_pylist()
    attempts = pq.read_table(out / "attempts.parquet").to_pylist()
    assert len(final) == 3 and 3 <= len(attempts) <= 6
    for r in final:
        assert (out / r["path"]).is_file() and (out / r["product_path"]).is_file()
        assert r["best_effort"] == (not r["accepted"])
    # The log is a manifest the oracle and the inspector accept.
    assert main(["world", "label", "--manifest", str(out / "attempts.parquet"),
                 "--out", str(tmp_path / "labels.parquet"),
                 "--training-manifest", str(tmp_path / "train.parquet")]) == 0  # fmt: skip
    labels = pq.read_table(tmp_path / "labels.parquet").column("oracle_label").to_pylist()
    assert labels == [r["verdict"] for r in attempts]
    # ... and, labelled, a training manifest that `train rfnet` reads (the data loop).
    from rewardkit.commands.rfnet import load_samples

    samples = load_samples(tmp_path / "train.parquet")
    assert samples.num_rows == len(attempts) and samples["label"].to_pylist() == labels


class ScoreJudge:
    """Score (seed % 1000) / 1000, Available when the score >= ``threshold``: a judge whose
    scores do not depend on the batch an image was painted in."""

    name = "score"

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, images, prompts, **context):
        scores = [(s % 1000) / 1000 for s in context["seeds"]]
        labels = ["Available" if x >= self.threshold else "Space Mismatch" for x in scores]
        return labels, torch.tensor(scores)


def test_replaying_a_full_run_is_what_the_loop_returns(tiny_generator, photos, seed_judge):
    """A run that painted every attempt, replayed at a threshold, picks the attempt (and
    costs the attempts) that the loop at that threshold does: a loop threshold can be chosen
    offline from one validation run."""
    jobs = _jobs(tiny_generator, photos, 6)
    run = lambda t: recurrent_generate(tiny_generator, jobs, ScoreJudge(t), FAST,  # noqa: E731
                                       max_attempts=4, batch_size=4, seed=3)  # fmt: skip
    full = run(1.5)  # nothing passes: every attempt painted
    assert len(full.attempts) == 24
    rows = [{"product_id": str(a.product), "attempt": a.attempt, "score": a.score}
            for a in full.attempts]  # fmt: skip
    scores, _, ids, left_out = attempt_grid(rows, ["Available"] * len(rows), 4)
    assert ids == [str(i) for i in range(6)] and left_out == 0
    outcomes = set()
    for t in (0.2, 0.5, 0.8, 0.95):
        real = run(t)
        pick, used = replay_loop(scores, t)
        assert [a.attempt for a in real.final] == (pick + 1).tolist(), t
        assert [sum(a.product == i for a in real.attempts) for i in range(6)] == used.tolist()
        outcomes |= {(a.accepted, a.attempt > 1) for a in real.final}
    # Every path exercised: accepted at once, accepted after retries, best effort.
    assert {(True, False), (True, True)} <= outcomes and any(not a for a, _ in outcomes)


def test_loop_threshold_choice_maximises_available_then_saves_attempts():
    # A strict threshold skips each product's first (defective, fairly scored) attempt.
    scores = np.array([[0.6, 0.9], [0.7, 0.8]])
    available = np.array([[False, True], [False, True]])
    choice = choose_loop_threshold(scores, available)
    assert choice["loop_threshold"] == pytest.approx(0.75)
    assert choice["available_rate"] == 1.0 and choice["mean_attempts"] == 2.0
    # Equal rates: the threshold that paints fewer images.
    scores = np.array([[0.9, 0.2], [0.4, 0.95], [0.3, 0.2]])
    available = np.array([[False, True], [True, False], [False, True]])
    choice = choose_loop_threshold(scores, available)
    assert choice["loop_threshold"] == pytest.approx(0.25)
    assert choice["available_rate"] == pytest.approx(1 / 3) and choice["mean_attempts"] == 1.0
    with pytest.raises(ValueError, match="one \\(products, attempts\\) grid"):
        choose_loop_threshold(scores, available[:, :1])
    # Products without every attempt judged and labelled are left out and counted.
    rows = [{"product_id": "a", "attempt": k, "score": 0.5} for k in (1, 2)]
    rows += [{"product_id": "b", "attempt": 1, "score": 0.5}]
    rows += [{"product_id": "c", "attempt": k, "score": 0.5} for k in (1, 2)]
    grid, avail, ids, left_out = attempt_grid(rows, ["Available", None, "Available",
                                                     "Available", "Size Mismatch"], 2)  # fmt: skip
    assert ids == ["c"] and left_out == 2 and avail.tolist() == [[True, False]]
