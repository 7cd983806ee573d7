import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from rewardkit.evaluation import (
    COLUMNS,
    EvalTable,
    PairwiseAccuracy,
    evaluate_scores,
    pairwise_accuracy,
    spearman,
    spearman_by_prompt,
    topk_hit_rate,
    truth_pairs,
)

# Three prompts x four images. Prompt 2 has a tie in truth (20 and 21).
APPEAL = {
    1: {10: 0.4, 11: 0.3, 12: 0.2, 13: 0.1},
    2: {20: 0.5, 21: 0.5, 22: 0.2, 23: 0.1},
    3: {30: 0.1, 31: 0.2, 32: 0.3, 33: 0.4},
}
# Scorer A: perfect on prompt 1; on prompt 2 ranks 21 = 22 > 20 > 23; constant on prompt 3.
SCORES_A = {10: 4, 11: 3, 12: 2, 13: 1, 20: 1, 21: 2, 22: 2, 23: 0, 30: 5, 31: 5, 32: 5, 33: 5}


def _truth() -> pa.Table:
    rows = [(i, p, a) for p, imgs in APPEAL.items() for i, a in imgs.items()]
    return pa.table(
        {
            "image_id": pa.array([r[0] for r in rows], pa.int64()),
            "prompt_id": pa.array([r[1] for r in rows], pa.int64()),
            "appeal": pa.array([r[2] for r in rows], pa.float64()),
        }
    )


def _scores(mapping: dict[int, float]) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(list(mapping), pa.int64()),
            "score": pa.array([float(v) for v in mapping.values()], pa.float64()),
        }
    )


def _oracle() -> dict[int, float]:
    return {i: a for imgs in APPEAL.values() for i, a in imgs.items()}


def _pairs() -> pa.Table:
    # test: prompts 1 and 2; image 99 has no score anywhere; train: prompt 3.
    rows = [
        (10, 13, 1, "test"),
        (21, 22, 2, "test"),
        (20, 22, 2, "test"),
        (99, 10, 1, "test"),
        (33, 30, 3, "train"),
        (32, 31, 3, "train"),
    ]
    return pa.table(
        {
            "pos_image_id": pa.array([r[0] for r in rows], pa.int64()),
            "neg_image_id": pa.array([r[1] for r in rows], pa.int64()),
            "prompt_id": pa.array([r[2] for r in rows], pa.int64()),
            "split": pa.array([r[3] for r in rows], pa.string()),
        }
    )


# ------------------------------------------------------------------------------ pairwise


def test_pairwise_accuracy_counts_ties_within_tolerance():
    pos, neg = [1.0, 2.0, 3.0, 1.0], [0.0, 2.05, 3.5, 1.0]
    acc = pairwise_accuracy(pos, neg, tol=0.1)  # win, tie, loss, tie
    assert (acc.n, acc.wins, acc.ties, acc.losses) == (4, 1, 2, 1)
    assert acc.tie_aware == pytest.approx(0.5)
    assert acc.ties_correct == pytest.approx(0.75)
    assert acc.strict == pytest.approx(0.25)
    exact = pairwise_accuracy(np.array(pos), np.array(neg))  # 2.0 vs 2.05 is now a loss
    assert (exact.wins, exact.ties, exact.losses) == (1, 1, 2)
    assert exact.tie_aware == pytest.approx(1.5 / 4)


def test_pairwise_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="no pairs"):
        pairwise_accuracy([], [])
    with pytest.raises(ValueError, match="3 values"):
        pairwise_accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        pairwise_accuracy([1.0, math.nan], [0.0, 0.0])
    with pytest.raises(ValueError, match="tol"):
        pairwise_accuracy([1.0], [0.0], tol=-1.0)
    with pytest.raises(ValueError, match="wins"):
        PairwiseAccuracy(n=2, wins=1, ties=0, losses=0)


# ---------------------------------------------------------------------------- truth pairs


def test_truth_pairs_all_prompts_drop_truth_ties_and_are_ordered():
    t = truth_pairs(_truth())
    assert t.column_names == ["pos_image_id", "neg_image_id", "prompt_id", "gap"]
    assert t.num_rows == 6 + 5 + 6  # prompt 2 loses its tied pair (20, 21)
    got = list(zip(t["pos_image_id"].to_pylist(), t["neg_image_id"].to_pylist(), strict=True))
    assert (20, 21) not in got and (21, 20) not in got
    assert got[:6] == [(10, 11), (10, 12), (10, 13), (11, 12), (11, 13), (12, 13)]
    assert got[-6:] == [(31, 30), (32, 30), (32, 31), (33, 30), (33, 31), (33, 32)]
    assert min(t["gap"].to_pylist()) > 0
    assert t.schema.field("pos_image_id").type == pa.int64()


def test_truth_pairs_prompt_filter_and_min_gap():
    t = truth_pairs(_truth(), prompt_ids=[1])
    assert set(t["prompt_id"].to_pylist()) == {1} and t.num_rows == 6
    wide = truth_pairs(_truth(), prompt_ids=[1], min_gap=0.15)  # gaps 0.2, 0.3, 0.2 remain
    got = list(zip(*(wide[c].to_pylist() for c in ("pos_image_id", "neg_image_id")), strict=True))
    assert got == [(10, 12), (10, 13), (11, 13)]
    assert truth_pairs(_truth(), prompt_ids=[7]).num_rows == 0
    with pytest.raises(ValueError, match="min_gap"):
        truth_pairs(_truth(), min_gap=-0.1)


def test_truth_pairs_rejects_duplicates_and_missing_columns():
    t = _truth()
    with pytest.raises(ValueError, match="more than once"):
        truth_pairs(pa.concat_tables([t, t.slice(0, 1)]))
    with pytest.raises(ValueError, match=r"truth: missing column\(s\) \['appeal'\]"):
        truth_pairs(t.drop(["appeal"]))


def test_truth_pairs_matches_brute_force_on_random_world():
    rng = np.random.default_rng(0)
    n = 300
    truth = pa.table(
        {
            "image_id": rng.permutation(n).astype(np.int64) + 1000,
            "prompt_id": rng.integers(0, 17, n),
            "appeal": rng.integers(0, 6, n) / 10.0,  # many ties
        }
    )
    t = truth_pairs(truth, min_gap=0.1)
    ids, pr, ap = (truth[c].to_pylist() for c in ("image_id", "prompt_id", "appeal"))
    brute = sorted(
        (pr[i], ids[i], ids[j])
        for i in range(n)
        for j in range(n)
        if pr[i] == pr[j] and ap[i] - ap[j] > 0.1
    )
    got = list(
        zip(t["prompt_id"].to_pylist(), t["pos_image_id"].to_pylist(),
            t["neg_image_id"].to_pylist(), strict=True)
    )  # fmt: skip
    assert got == brute


# ------------------------------------------------------------------------------- spearman


def test_spearman_pooled_matches_scipy_and_constant_is_zero():
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 5, 40), rng.integers(0, 5, 40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        spearman([1], [1])


def test_spearman_by_prompt_hand_values():
    # prompt 1: 1.0; prompt 2: 0.5 by hand (rx = [3.5, 3.5, 2, 1], ry = [2, 3.5, 3.5, 1]:
    # cov 2.25, var 4.5 each); prompt 3: constant scores -> 0.
    rho2 = stats.spearmanr([0.5, 0.5, 0.2, 0.1], [1, 2, 2, 0]).statistic
    assert rho2 == pytest.approx(0.5)
    assert spearman_by_prompt(_scores(SCORES_A), _truth()) == pytest.approx((1 + 0.5 + 0) / 3)
    assert spearman_by_prompt(_scores(SCORES_A), _truth(), [1, 2]) == pytest.approx(0.75)
    assert spearman_by_prompt(_scores(_oracle()), _truth()) == pytest.approx(1.0)


def test_spearman_by_prompt_skips_small_prompts_and_unscored_images():
    partial = {i: s for i, s in SCORES_A.items() if i not in (12, 13, 23)}
    # prompt 1 keeps 2 images -> skipped; prompt 2 keeps 20, 21, 22; prompt 3 constant -> 0
    rho2 = stats.spearmanr([0.5, 0.5, 0.2], [1, 2, 2]).statistic
    got = spearman_by_prompt(_scores(partial), _truth())
    assert got == pytest.approx((rho2 + 0.0) / 2)
    tiny = {10: 1.0, 11: 0.0}
    assert math.isnan(spearman_by_prompt(_scores(tiny), _truth()))


def test_spearman_by_prompt_matches_scipy_per_group():
    rng = np.random.default_rng(2)
    n = 120
    prompt = rng.integers(0, 9, n)
    truth = pa.table(
        {"image_id": np.arange(n), "prompt_id": prompt, "appeal": rng.integers(0, 4, n) * 1.0}
    )
    score = rng.integers(0, 4, n).astype(np.float64)
    scores = pa.table({"image_id": np.arange(n), "score": score})
    expected = []
    for p in np.unique(prompt):
        m = prompt == p
        a, s = truth["appeal"].to_numpy()[m], score[m]
        if m.sum() >= 3:
            rho = stats.spearmanr(s, a).statistic
            expected.append(0.0 if np.isnan(rho) else rho)
    assert spearman_by_prompt(scores, truth) == pytest.approx(np.mean(expected))


# ---------------------------------------------------------------------------------- top-k


def test_topk_hit_rate_hand_values():
    s = _scores(SCORES_A)
    # k=1: prompt 1 picks 10 (hit); prompt 2 ties 21/22 at 2 -> smaller id 21, truly tied top
    # with 20 (hit); prompt 3 constant -> smallest id 30, truth top is 33 (miss).
    assert topk_hit_rate(s, _truth(), k=1) == pytest.approx(2 / 3)
    # k=2: prompt 1 {10, 11} vs {10, 11}: 1; prompt 2 {21, 22} vs {20, 21}: 1/2;
    # prompt 3 {30, 31} vs {33, 32}: 0.
    assert topk_hit_rate(s, _truth(), k=2) == pytest.approx(0.5)
    assert topk_hit_rate(s, _truth(), k=1, prompt_ids=[3]) == 0.0
    assert topk_hit_rate(_scores(_oracle()), _truth(), k=3) == pytest.approx(1.0)
    # k=4 leaves no prompt with more than k images
    assert math.isnan(topk_hit_rate(s, _truth(), k=4))
    with pytest.raises(ValueError, match="k: expected"):
        topk_hit_rate(s, _truth(), k=0)


def test_topk_truth_ties_at_the_boundary_all_count():
    # prompt 2 with k=1: the truth's top-1 is {20, 21}; picking 20 or 21 is a hit
    for favourite in (20, 21):
        sc = {20: 0.0, 21: 0.0, 22: 0.0, 23: 0.0, favourite: 1.0}
        assert topk_hit_rate(_scores(sc), _truth(), k=1, prompt_ids=[2]) == 1.0


# ------------------------------------------------------------------------------- evaluate


def test_evaluate_scores_on_held_out_split():
    partial = {i: a for i, a in _oracle().items() if i != 13}
    table = evaluate_scores(
        {"A": _scores(SCORES_A), "oracle": _scores(_oracle()), "partial": _scores(partial)},
        _truth(),
        _pairs(),
    )
    a, oracle, part = table.rows
    assert list(a) == list(COLUMNS)
    # A on test pairs: (10,13) win, (21,22) tie, (20,22) loss, (99,10) dropped
    assert (a["pairs_n"], a["missing"]) == (3, 1)
    assert a["pairs_acc"] == pytest.approx(1.5 / 3)
    assert a["pairs_acc_ties_correct"] == pytest.approx(2 / 3)
    # truth pairs on prompts 1 and 2 only: 6 + 5; A wins 6 + 3, ties (21,22), loses (20,22)
    assert a["truth_pairs_n"] == 11
    assert a["truth_acc"] == pytest.approx(9.5 / 11)
    assert a["truth_acc_ties_correct"] == pytest.approx(10 / 11)
    assert a["spearman"] == pytest.approx(0.75)
    assert a["topk"] == pytest.approx(1.0)
    assert oracle["pairs_acc"] == oracle["truth_acc"] == oracle["spearman"] == 1.0
    assert oracle["missing"] == 1
    # partial lacks 13: curated (10,13) dropped, truth (10,13), (11,13), (12,13) dropped
    assert (part["pairs_n"], part["truth_pairs_n"], part["missing"]) == (2, 8, 2 + 3)
    assert part["spearman"] == pytest.approx(1.0)


def test_evaluate_scores_split_filtering_and_truth_only():
    tr = evaluate_scores({"A": _scores(SCORES_A)}, _truth(), _pairs(), split="train").rows[0]
    # prompt 3 only: both train pairs tie under the constant scorer
    assert (tr["pairs_n"], tr["pairs_acc"], tr["pairs_acc_ties_correct"]) == (2, 0.5, 1.0)
    assert (tr["truth_pairs_n"], tr["truth_acc"], tr["spearman"], tr["topk"]) == (6, 0.5, 0, 0)
    every = evaluate_scores({"A": _scores(SCORES_A)}, None, _pairs(), split=None).rows[0]
    assert (every["pairs_n"], every["missing"]) == (5, 1)
    assert math.isnan(every["truth_acc"]) and every["truth_pairs_n"] == 0
    only = evaluate_scores({"A": _scores(SCORES_A)}, _truth(), None).rows[0]
    # all 17 truth pairs: wins 6 + 3 + 0, ties 0 + 1 + 6, losses 1
    assert only["truth_pairs_n"] == 17
    assert only["truth_acc"] == pytest.approx(12.5 / 17)
    assert only["truth_acc_ties_correct"] == pytest.approx(16 / 17)
    assert only["spearman"] == pytest.approx(0.5)
    assert only["topk"] == pytest.approx(2 / 3)
    assert only["pairs_n"] == 0 and math.isnan(only["pairs_acc"])


def test_evaluate_scores_errors():
    s = {"A": _scores(SCORES_A)}
    with pytest.raises(ValueError, match="none of the 4 pairs"):
        evaluate_scores({"empty": _scores({1000: 1.0})}, None, _pairs())
    with pytest.raises(ValueError, match=r"split == 'val' \(splits present: \['test', 'train'\]"):
        evaluate_scores(s, _truth(), _pairs(), split="val")
    with pytest.raises(ValueError, match="give truth, pairs or both"):
        evaluate_scores(s, None, None)
    with pytest.raises(ValueError, match="no scorers"):
        evaluate_scores({}, _truth(), None)
    dup = pa.table({"image_id": [10, 10], "score": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"scores\['dup'\]: image_id 10 has more than one"):
        evaluate_scores({"dup": dup}, None, _pairs())
    with pytest.raises(ValueError, match=r"pairs: missing column\(s\) \['split'\]"):
        evaluate_scores(s, None, _pairs().drop(["split"]))
    with pytest.raises(ValueError, match="no image pair with different appeal"):
        evaluate_scores(s, _truth().filter(pa.array([False] * 12)), _pairs())


def test_null_and_nan_scores_count_as_missing():
    t = pa.table(
        {"image_id": [10, 13, 20, 21, 22], "score": pa.array([1.0, None, 3.0, math.nan, 2.0])}
    )
    row = evaluate_scores({"n": t}, None, _pairs()).rows[0]
    # (10,13): null score, (21,22): NaN score, (99,10): absent -> dropped; (20,22) wins
    assert (row["pairs_n"], row["missing"], row["pairs_acc"]) == (1, 3, 1.0)


# ------------------------------------------------------------------------------ rendering


def _table() -> EvalTable:
    return evaluate_scores(
        {"A": _scores(SCORES_A), "oracle": _scores(_oracle())}, _truth(), _pairs(), k=1
    )


def test_to_arrow_schema_and_values():
    t = _table().to_arrow()
    assert t.column_names == list(COLUMNS)
    assert t.schema.field("pairs_n").type == pa.int64()
    assert t.schema.field("pairs_acc").type == pa.float64()
    assert t["scorer"].to_pylist() == ["A", "oracle"]


def test_to_markdown_percentages_and_bold_best():
    md = _table().to_markdown()
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Scorer | Pairs (test) | Pair acc. % |")
    assert "Top-1 hit %" in lines[0]
    assert lines[1].startswith("| --- | --: |")
    a, oracle = lines[2], lines[3]
    # A: pairs 50.0 / 66.7, truth 86.4 / 90.9, spearman 0.750, top-1 100.0 (tied best)
    assert a == "| A | 3 | 50.0 | 66.7 | 11 | 86.4 | 90.9 | 0.750 | **100.0** | 1 |"
    assert oracle == (
        "| oracle | 3 | **100.0** | **100.0** | 11 | **100.0** | **100.0** | **1.000** "
        "| **100.0** | 1 |"
    )


def test_markdown_hides_uncomputed_groups_and_single_rows_are_plain():
    md = evaluate_scores({"A": _scores(SCORES_A)}, None, _pairs()).to_markdown()
    assert "Truth" not in md and "Spearman" not in md and "**" not in md
    assert "| A | 3 | 50.0 | 66.7 | 1 |" in md


def test_to_html_bolds_best_and_escapes():
    table = _table()
    table.rows[0]["scorer"] = "<A>"
    html = table.to_html()
    assert html.startswith("<table><tr><th>Scorer</th>")
    assert "&lt;A&gt;" in html
    assert "<td><b>100.0</b></td>" in html and "<td>50.0</td>" in html
