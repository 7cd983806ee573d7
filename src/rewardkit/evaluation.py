"""Evaluation of reward scorers: pure metrics over Arrow tables and numpy arrays.

Scoring happens elsewhere; it yields, per scorer, a table ``image_id -> score``. This module
compares those scores with what people preferred:

- ``pairwise_accuracy``: share of (positive, negative) pairs scored the right way round, the
  Social Reward paper's metric (Table 4), with ties reported both ways.
- ``truth_pairs``: every within-prompt pair of a simulated world whose true appeal differs.
- ``spearman`` / ``spearman_by_prompt``: rank agreement with the true appeal.
- ``topk_hit_rate``: how often the scorer's favourites are truly among the most appealing.
- ``evaluate_scores``: all of the above for several scorers side by side, as an ``EvalTable``
  that renders to Arrow, Markdown and HTML with the best value per column in bold.

Image ids may be any type numpy can sort and compare (int64 in the community schema).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numpy.typing import ArrayLike

from rewardkit.report.html import esc

_MAX_PAIRS_PER_CHUNK = 4_000_000  # bounds the memory of truth_pairs on very large prompts


# ---------------------------------------------------------------------------- pairwise accuracy


@dataclass(frozen=True)
class PairwiseAccuracy:
    """Outcome counts of scored (positive, negative) pairs and the accuracies derived from them.

    Attributes:
        n: number of pairs.
        wins: pairs where the positive scored higher (by more than the tie tolerance).
        ties: pairs whose two scores are within the tolerance.
        losses: pairs where the negative scored higher.
        tie_aware: (wins + ties / 2) / n: a tie is a coin flip.
        ties_correct: (wins + ties) / n: the public Social Reward code's convention (``>=``),
            which credits a constant scorer with 100%.
        strict: wins / n: a tie counts as wrong.
    """

    n: int
    wins: int
    ties: int
    losses: int
    tie_aware: float = field(init=False)
    ties_correct: float = field(init=False)
    strict: float = field(init=False)

    def __post_init__(self) -> None:
        if self.n <= 0 or self.wins + self.ties + self.losses != self.n:
            raise ValueError(
                "PairwiseAccuracy: expected n > 0 and wins + ties + losses == n, got "
                f"n={self.n}, wins={self.wins}, ties={self.ties}, losses={self.losses}"
            )
        object.__setattr__(self, "tie_aware", (self.wins + 0.5 * self.ties) / self.n)
        object.__setattr__(self, "ties_correct", (self.wins + self.ties) / self.n)
        object.__setattr__(self, "strict", self.wins / self.n)


def pairwise_accuracy(
    score_pos: ArrayLike, score_neg: ArrayLike, tol: float = 0.0
) -> PairwiseAccuracy:
    """Count how often the positive of each pair scores above its negative.

    Args:
        score_pos: scores of the positives, shape (N,).
        score_neg: scores of the negatives, shape (N,), aligned with ``score_pos``.
        tol: a pair is a tie when ``|pos - neg| <= tol`` (0: only exact ties).

    Returns:
        The counts and the tie-aware, ties-correct and strict accuracies.

    Raises:
        ValueError: on empty or misaligned input, a NaN score (drop unscored pairs first) or
            a negative or NaN ``tol``.
    """
    pos = np.asarray(score_pos, dtype=np.float64).reshape(-1)  # (N,)
    neg = np.asarray(score_neg, dtype=np.float64).reshape(-1)  # (N,)
    if pos.shape != neg.shape:
        raise ValueError(f"score_pos has {pos.size} values but score_neg has {neg.size}")
    if pos.size == 0:
        raise ValueError("pairwise_accuracy: no pairs (empty score arrays)")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("pairwise_accuracy: NaN score; drop pairs with a missing score first")
    if not tol >= 0.0:  # also rejects NaN
        raise ValueError(f"tol: expected a number >= 0, got {tol!r}")
    diff = pos - neg  # (N,)
    tie = np.abs(diff) <= tol
    wins = int(np.count_nonzero((diff > 0) & ~tie))
    ties = int(np.count_nonzero(tie))
    return PairwiseAccuracy(n=int(diff.size), wins=wins, ties=ties, losses=diff.size - wins - ties)


# ------------------------------------------------------------------------------ table helpers


def _require(table: pa.Table, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{what}: missing column(s) {missing} (has {table.column_names}, "
            f"expected {list(columns)})"
        )


def _ids(table: pa.Table, column: str, what: str) -> np.ndarray:
    """A key column as numpy, rejecting nulls (which would not match anything)."""
    col = table[column]
    if col.null_count:
        raise ValueError(f"{what}.{column}: {col.null_count} null value(s); expected ids")
    return col.to_numpy()


def _first_duplicate(sorted_ids: np.ndarray) -> Any | None:
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    return _plain(sorted_ids[dup[0]]) if dup.size else None


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for readable error messages)."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True)
class _ScoreIndex:
    """A scorer's table sorted by image id, for vectorised look-ups."""

    ids: np.ndarray  # (S,) sorted image ids
    scores: np.ndarray  # (S,) float64; NaN where the score is null or NaN

    @classmethod
    def from_table(cls, table: pa.Table, what: str) -> _ScoreIndex:
        _require(table, ("image_id", "score"), what)
        ids = _ids(table, "image_id", what)
        # nulls become NaN: an image without a score is treated as missing
        scores = table["score"].to_numpy().astype(np.float64)
        order = np.argsort(ids, kind="stable")
        ids, scores = ids[order], scores[order]
        dup = _first_duplicate(ids)
        if dup is not None:
            raise ValueError(f"{what}: image_id {dup!r} has more than one score")
        return cls(ids, scores)

    def lookup(self, query: np.ndarray) -> np.ndarray:
        """Scores of ``query`` (Q,) image ids; NaN for ids without a score."""
        out = np.full(query.shape, np.nan)  # (Q,)
        if self.ids.size == 0 or query.size == 0:
            return out
        pos = np.minimum(np.searchsorted(self.ids, query), self.ids.size - 1)
        hit = self.ids[pos] == query
        out[hit] = self.scores[pos[hit]]
        return out


def _truth_arrays(
    truth: pa.Table, prompt_ids: Iterable[Any] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_id, prompt_id, appeal) of the truth table, restricted to ``prompt_ids``."""
    _require(truth, ("image_id", "prompt_id", "appeal"), "truth")
    ids = _ids(truth, "image_id", "truth")
    prompt = _ids(truth, "prompt_id", "truth")
    appeal = truth["appeal"].to_numpy().astype(np.float64)
    if not np.isfinite(appeal).all():
        bad = _plain(ids[~np.isfinite(appeal)][0])
        raise ValueError(f"truth.appeal: expected finite numbers, image_id {bad!r} has none")
    dup = _first_duplicate(np.sort(ids))
    if dup is not None:
        raise ValueError(f"truth: image_id {dup!r} appears more than once")
    if prompt_ids is not None:
        keep = np.isin(prompt, np.asarray(list(prompt_ids)))
        ids, prompt, appeal = ids[keep], prompt[keep], appeal[keep]
    return ids, prompt, appeal


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")


def _codes(values: np.ndarray) -> np.ndarray:
    """Dense integer codes that sort like ``values`` (works for strings too)."""
    return np.unique(values, return_inverse=True)[1].reshape(-1)


# ---------------------------------------------------------------------------------- truth pairs


def truth_pairs(
    truth: pa.Table, prompt_ids: Iterable[Any] | None = None, min_gap: float = 0.0
) -> pa.Table:
    """Every within-prompt image pair whose true appeal differs by more than ``min_gap``.

    Args:
        truth: a table with image_id, prompt_id and appeal (a simulation's
            ``truth/images.parquet``).
        prompt_ids: keep only these prompts (the held-out ones); None keeps all.
        min_gap: a pair is kept when ``appeal(pos) - appeal(neg) > min_gap``; with 0 only
            exact ties in truth are dropped.

    Returns:
        Columns pos_image_id, neg_image_id, prompt_id (types as in ``truth``) and gap
        (float64, > min_gap), sorted by prompt_id, pos_image_id, neg_image_id.

    Raises:
        ValueError: on a missing column, a null id, a duplicate image_id, a non-finite
            appeal, or a negative ``min_gap``.
    """
    if not min_gap >= 0.0:
        raise ValueError(f"min_gap: expected a number >= 0, got {min_gap!r}")
    ids, prompt, appeal = _truth_arrays(truth, prompt_ids)
    # sort by (prompt, image) so each prompt is one contiguous block and the output is ordered
    order = np.lexsort((_codes(ids), _codes(prompt))) if ids.size else np.arange(0)
    ids, prompt, appeal = ids[order], prompt[order], appeal[order]
    group = _codes(prompt)  # (N,)
    size = np.bincount(group)  # (G,)
    start = np.cumsum(size) - size  # (G,) first row of each prompt
    partners = size[group]  # (N,) each image is compared with every image of its prompt
    ends = np.cumsum(partners)  # (N,)

    lefts, rights = [], []
    first = 0
    while first < ids.size:  # chunks of images, so that huge prompts do not exhaust memory
        last = max(first + 1, int(np.searchsorted(ends, ends[first] + _MAX_PAIRS_PER_CHUNK)))
        rep = partners[first:last]
        left = np.repeat(np.arange(first, last), rep)  # (P,)
        offset = np.arange(rep.sum()) - np.repeat(np.cumsum(rep) - rep, rep)  # (P,)
        right = start[group[left]] + offset  # (P,)
        keep = appeal[left] - appeal[right] > min_gap
        lefts.append(left[keep])
        rights.append(right[keep])
        first = last
    left = np.concatenate(lefts) if lefts else np.arange(0)
    right = np.concatenate(rights) if rights else np.arange(0)
    id_type = truth.schema.field("image_id").type
    return pa.table(
        {
            "pos_image_id": pa.array(ids[left], type=id_type),
            "neg_image_id": pa.array(ids[right], type=id_type),
            "prompt_id": pa.array(prompt[left], type=truth.schema.field("prompt_id").type),
            "gap": pa.array(appeal[left] - appeal[right], type=pa.float64()),
        }
    )


# ------------------------------------------------------------------------ rank-based metrics


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation of two pooled samples (average ranks for ties).

    Args:
        x: values, shape (N,).
        y: values, shape (N,), aligned with ``x``.

    Returns:
        The correlation in [-1, 1]; 0.0 when either side is constant (no ranking to agree
        with), where scipy would return NaN.

    Raises:
        ValueError: on misaligned input, fewer than 2 values or a NaN.
    """
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"x has {a.size} values but y has {b.size}")
    if a.size < 2:
        raise ValueError(f"spearman: expected at least 2 values, got {a.size}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("spearman: NaN value; drop missing values first")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    from scipy import stats  # imported here: scipy.stats takes seconds to import

    return float(stats.spearmanr(a, b).statistic)


@dataclass(frozen=True)
class _Scored:
    """Truth images of the chosen prompts that have a score, grouped by prompt."""

    group: np.ndarray  # (M,) prompt code 0..G-1
    image_code: np.ndarray  # (M,) integer codes ordered like the image ids
    score: np.ndarray  # (M,) float64
    appeal: np.ndarray  # (M,) float64
    size: np.ndarray  # (G,) scored images per prompt


def _scored(scores: pa.Table, truth: pa.Table, prompt_ids: Iterable[Any] | None) -> _Scored:
    ids, prompt, appeal = _truth_arrays(truth, prompt_ids)
    score = _ScoreIndex.from_table(scores, "scores").lookup(ids)
    keep = ~np.isnan(score)  # images without a score leave their prompt
    ids, prompt, appeal, score = ids[keep], prompt[keep], appeal[keep], score[keep]
    group = _codes(prompt)
    return _Scored(group, _codes(ids), score, appeal, np.bincount(group))


def _group_positions(group_sorted: np.ndarray) -> np.ndarray:
    """0-based position of each row within its group, for rows sorted by group."""
    return np.arange(group_sorted.size) - np.searchsorted(group_sorted, group_sorted, "left")


def _group_ranks(group: np.ndarray, values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` within each group, ties given their average rank."""
    order = np.lexsort((values, group))
    g, v = group[order], values[order]
    ordinal = _group_positions(g) + 1.0  # (M,)
    new_run = np.ones(g.size, dtype=bool)
    new_run[1:] = (g[1:] != g[:-1]) | (v[1:] != v[:-1])
    run = np.cumsum(new_run) - 1  # (M,) tie run id
    average = np.bincount(run, weights=ordinal) / np.bincount(run)
    ranks = np.empty(g.size)
    ranks[order] = average[run]
    return ranks


def spearman_by_prompt(
    scores: pa.Table, truth: pa.Table, prompt_ids: Iterable[Any] | None = None
) -> float:
    """Mean over prompts of the Spearman correlation between scores and true appeal.

    Only images with both a truth row and a (non-null, non-NaN) score take part. Each prompt
    counts once. Rules that keep the result deterministic:

    - a prompt with fewer than 3 scored images is skipped (with 2 the correlation is always
      +-1, which pairwise accuracy already measures);
    - a prompt whose scores (or true appeals) are all equal counts as correlation 0.

    Args:
        scores: columns image_id and score.
        truth: columns image_id, prompt_id and appeal.
        prompt_ids: the prompts to average over (e.g. held-out ones); None: all in ``truth``.

    Returns:
        The mean correlation in [-1, 1], or NaN when no prompt has 3 scored images.

    Raises:
        ValueError: on a missing column, a null id, a duplicate image_id or a bad appeal.
    """
    s = _scored(scores, truth, prompt_ids)
    valid = s.size >= 3  # (G,)
    if not valid.any():
        return float("nan")
    rx = _group_ranks(s.group, s.score)  # (M,)
    ry = _group_ranks(s.group, s.appeal)  # (M,)
    n = s.size.astype(np.float64)
    dx = rx - (np.bincount(s.group, weights=rx) / n)[s.group]
    dy = ry - (np.bincount(s.group, weights=ry) / n)[s.group]
    cov = np.bincount(s.group, weights=dx * dy)  # (G,)
    vx = np.bincount(s.group, weights=dx * dx)
    vy = np.bincount(s.group, weights=dy * dy)
    constant = (vx == 0) | (vy == 0)  # ranks of equal values are exactly equal
    rho = np.where(constant, 0.0, cov / np.sqrt(np.where(constant, 1.0, vx * vy)))
    return float(np.clip(rho[valid], -1.0, 1.0).mean())


def topk_hit_rate(
    scores: pa.Table, truth: pa.Table, k: int = 1, prompt_ids: Iterable[Any] | None = None
) -> float:
    """Share of the scorer's top-k images per prompt that are among the truly top-k.

    Per prompt, over the images that have both truth and a score: the scorer's top-k are
    the k highest scores, equal scores broken by the smaller image_id (so a constant scorer
    picks the smallest ids, deterministically). The truth's top-k are every image whose
    appeal is at least the k-th highest appeal of the prompt (images tied at that boundary
    all count). The prompt's hit rate is hits / k; the result is the mean over prompts.
    Prompts with k or fewer scored images are skipped: every choice would be a hit.

    Args:
        scores: columns image_id and score.
        truth: columns image_id, prompt_id and appeal.
        k: how many favourites per prompt (1: is the scorer's favourite the best image?).
        prompt_ids: the prompts to average over; None: all prompts in ``truth``.

    Returns:
        The mean hit rate in [0, 1], or NaN when no prompt has more than k scored images.

    Raises:
        ValueError: for k < 1, and as ``spearman_by_prompt`` for bad tables.
    """
    _check_k(k)
    s = _scored(scores, truth, prompt_ids)
    valid = s.size > k  # (G,)
    if not valid.any():
        return float("nan")
    # scorer's pick: highest score first, then smallest image id
    order = np.lexsort((s.image_code, -s.score, s.group))
    picked = np.empty(s.group.size, dtype=bool)
    picked[order] = _group_positions(s.group[order]) < k  # (M,)
    # truth's k-th highest appeal per prompt
    order = np.lexsort((-s.appeal, s.group))
    at_k = _group_positions(s.group[order]) == k - 1
    threshold = np.full(s.size.size, np.inf)  # (G,)
    threshold[s.group[order][at_k]] = s.appeal[order][at_k]
    truly_top = s.appeal >= threshold[s.group]  # (M,)
    hits = np.bincount(s.group, weights=picked & truly_top, minlength=s.size.size)  # (G,)
    return float((hits[valid] / k).mean())


# -------------------------------------------------------------------------------- evaluation


COLUMNS: tuple[str, ...] = (
    "scorer",
    "pairs_n",
    "pairs_acc",
    "pairs_acc_ties_correct",
    "truth_pairs_n",
    "truth_acc",
    "truth_acc_ties_correct",
    "spearman",
    "topk",
    "missing",
)
_TYPES = {"scorer": pa.string(), "pairs_n": pa.int64(), "truth_pairs_n": pa.int64(),
          "missing": pa.int64()}  # fmt: skip
_PERCENT = ("pairs_acc", "pairs_acc_ties_correct", "truth_acc", "truth_acc_ties_correct", "topk")
_PAIR_GROUP = ("pairs_n", "pairs_acc", "pairs_acc_ties_correct")
_PAIR_IDS = ("pos_image_id", "neg_image_id")
_TRUTH_GROUP = ("truth_pairs_n", "truth_acc", "truth_acc_ties_correct", "spearman", "topk")


@dataclass
class EvalTable:
    """Scorers side by side: one row per scorer, keys as in ``COLUMNS``.

    Row keys: scorer; pairs_n, pairs_acc, pairs_acc_ties_correct (held-out curated pairs:
    pairs evaluated, tie-aware and ties-correct accuracy); truth_pairs_n, truth_acc,
    truth_acc_ties_correct (ground-truth pairs of the held-out prompts); spearman (mean per
    prompt); topk (top-k hit rate); missing (pairs dropped because an image had no score,
    curated and truth pairs together). Metrics not computed are NaN, their counts 0.
    Accuracies and hit rates are fractions in [0, 1]; the renderings show percentages.

    Attributes:
        rows: one dict per scorer, in the order the scorers were given.
        split: the split the curated pairs came from (None: all rows).
        k: the k of the top-k hit rate.
        held_out: the prompts' overlap with the scorers' training (``Overlap``), if checked.
    """

    rows: list[dict[str, Any]]
    split: str | None = "test"
    k: int = 1
    held_out: Any = None  # rewardkit.data.keys.Overlap of the evaluated prompts, when checked

    def to_arrow(self) -> pa.Table:
        """The rows as an Arrow table with columns ``COLUMNS`` (ints int64, metrics float64)."""
        return pa.table(
            {c: pa.array([r[c] for r in self.rows], type=_TYPES.get(c, pa.float64()))
             for c in COLUMNS}
        )  # fmt: skip

    def to_markdown(self) -> str:
        """A Markdown table like the paper's Table 4: percentages with one decimal, Spearman
        with three, the best value of each metric column in bold (every row that ties for
        it, judged on the shown values; only when at least two rows have a value). Column
        groups that were not computed (no pairs, no truth) are left out."""
        header, body = self._cells()
        align = ["---"] + ["--:"] * (len(header) - 1)
        lines = [_md_row(header), _md_row(align)]
        for cells in body:
            lines.append(_md_row([f"**{t}**" if b else t for t, b in cells], escape=True))
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """The same table as ``to_markdown`` as an HTML ``<table>`` (the report's styling),
        best values in ``<b>``."""
        header, body = self._cells()
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        rows = "".join(
            "<tr>" + "".join(f"<td><b>{esc(t)}</b></td>" if b else f"<td>{esc(t)}</td>"
                             for t, b in cells) + "</tr>"
            for cells in body
        )  # fmt: skip
        return f"<table><tr>{head}</tr>{rows}</table>"

    def _cells(self) -> tuple[list[str], list[list[tuple[str, bool]]]]:
        """Header and (text, bold) cells of the columns worth showing."""
        shown = [c for c in COLUMNS if not self._hidden(c)]
        header = [_header(c, self.split, self.k) for c in shown]
        shown_values = {c: [_rounded(c, r[c]) for r in self.rows] for c in shown}
        best: dict[str, float] = {}
        for c in shown:
            finite = [v for v in shown_values[c] if v is not None and not math.isnan(v)]
            if c in _PERCENT + ("spearman",) and len(finite) >= 2:
                best[c] = max(finite)
        body = [
            [(_text(c, r[c]), c in best and shown_values[c][i] == best[c]) for c in shown]
            for i, r in enumerate(self.rows)
        ]
        return header, body

    def _hidden(self, column: str) -> bool:
        for group in (_PAIR_GROUP, _TRUTH_GROUP):
            if column in group:
                return all(
                    (r[c] == 0 if c.endswith("_n") else math.isnan(r[c]))
                    for r in self.rows
                    for c in group
                )
        return False


def _header(column: str, split: str | None, k: int) -> str:
    on = f" ({split})" if split else ""
    return {
        "scorer": "Scorer",
        "pairs_n": f"Pairs{on}",
        "pairs_acc": "Pair acc. %",
        "pairs_acc_ties_correct": "Pair acc. % (ties correct)",
        "truth_pairs_n": "Truth pairs",
        "truth_acc": "Truth acc. %",
        "truth_acc_ties_correct": "Truth acc. % (ties correct)",
        "spearman": "Spearman",
        "topk": f"Top-{k} hit %",
        "missing": "Missing",
    }[column]


def _rounded(column: str, value: Any) -> float | None:
    if column in _PERCENT:
        return round(100.0 * value, 1) if not math.isnan(value) else math.nan
    if column == "spearman":
        return round(value, 3) if not math.isnan(value) else math.nan
    return None


def _text(column: str, value: Any) -> str:
    if column == "scorer":
        return str(value)
    if column in _PERCENT or column == "spearman":
        v = _rounded(column, value)
        if v is None or math.isnan(v):
            return "–"
        return f"{v:.1f}" if column in _PERCENT else f"{v:.3f}"
    return f"{int(value):,}"


def _md_row(cells: Sequence[str], escape: bool = False) -> str:
    if escape:
        cells = [c.replace("|", "\\|") for c in cells]
    return "| " + " | ".join(cells) + " |"


def _held_out(pairs: pa.Table, split: str | None, need_prompt: bool) -> pa.Table:
    """The rows of ``pairs`` in ``split`` (all rows for None)."""
    cols = ["pos_image_id", "neg_image_id"] + (["prompt_id"] if need_prompt else [])
    _require(pairs, cols + ([] if split is None else ["split"]), "pairs")
    if split is None:
        held = pairs
    else:
        names = pairs["split"]
        if pa.types.is_dictionary(names.type):
            names = names.cast(pa.string())
        held = pairs.filter(pc.fill_null(pc.equal(names, split), False))
        if held.num_rows == 0:
            found = sorted(str(s) for s in pc.unique(names).to_pylist())
            raise ValueError(f"pairs: no rows with split == {split!r} (splits present: {found})")
    if held.num_rows == 0:
        raise ValueError("pairs: the table has no rows")
    return held


def _score_pairs(
    index: _ScoreIndex, pos_ids: np.ndarray, neg_ids: np.ndarray, tol: float, what: str
) -> tuple[PairwiseAccuracy, int]:
    """Accuracy over the pairs whose two images are scored, and how many were dropped."""
    pos, neg = index.lookup(pos_ids), index.lookup(neg_ids)  # (N,), (N,)
    ok = ~(np.isnan(pos) | np.isnan(neg))
    if not ok.any():
        raise ValueError(f"{what}: none of the {ok.size} pairs has both images scored")
    return pairwise_accuracy(pos[ok], neg[ok], tol), int(ok.size - ok.sum())


def evaluate_scores(
    scores: Mapping[str, pa.Table],
    truth: pa.Table | None,
    pairs: pa.Table | None,
    split: str | None = "test",
    k: int = 1,
    *,
    tol: float = 0.0,
) -> EvalTable:
    """Evaluate several scorers on held-out pairs and, when known, the true appeal.

    For each scorer:

    (a) with ``pairs``: pairwise accuracy (tie-aware and ties-correct) on the curated pairs
        whose ``split`` is ``split``;
    (b) with ``truth``: on the held-out prompts (the prompt ids of those pairs, or every
        prompt of ``truth`` when ``pairs`` is None), pairwise accuracy on ``truth_pairs``
        (ties in truth dropped), ``spearman_by_prompt`` and ``topk_hit_rate``.

    A pair with an unscored image (absent, null or NaN score) is dropped and counted in
    ``missing``; unscored images also leave the per-prompt metrics.

    Args:
        scores: scorer name -> table with columns image_id and score (higher is better).
        truth: columns image_id, prompt_id and appeal (``truth/images.parquet``), or None.
        pairs: curated pairs with pos_image_id, neg_image_id, prompt_id and split (the
            ``curate`` output), or None. prompt_id is needed only with ``truth``.
        split: which split is held out; None uses every row (no split column needed).
        k: the k of the top-k hit rate.
        tol: score difference up to which a pair counts as a tie.

    Returns:
        An ``EvalTable`` with one row per scorer, in the order of ``scores``.

    Raises:
        ValueError: if there are no scorers, neither truth nor pairs, no pair in the split,
            no truth pair on the held-out prompts, a scorer with no scored pair at all, or a
            malformed table (naming it and the column).
    """
    if not scores:
        raise ValueError("scores: no scorers to evaluate")
    if truth is None and pairs is None:
        raise ValueError("evaluate_scores: give truth, pairs or both")
    _check_k(k)
    held = None if pairs is None else _held_out(pairs, split, need_prompt=truth is not None)
    held_ids = None if held is None else tuple(_ids(held, c, "pairs") for c in _PAIR_IDS)
    prompt_ids = None
    t_pairs = None
    if truth is not None:
        if held is not None:
            prompt_ids = np.unique(_ids(held, "prompt_id", "pairs"))
        t_pairs = truth_pairs(truth, prompt_ids)
        if t_pairs.num_rows == 0:
            where = "all prompts" if prompt_ids is None else f"the {prompt_ids.size} prompts"
            raise ValueError(f"truth: no image pair with different appeal on {where} held out")

    rows = []
    for name, table in scores.items():
        index = _ScoreIndex.from_table(table, f"scores[{name!r}]")
        row: dict[str, Any] = {c: math.nan for c in COLUMNS}
        row.update(scorer=str(name), pairs_n=0, truth_pairs_n=0, missing=0)
        if held_ids is not None:
            acc, dropped = _score_pairs(
                index,
                *held_ids,
                tol,
                f"scorer {name!r} on the {split or 'all'} pairs",
            )
            row.update(pairs_n=acc.n, pairs_acc=acc.tie_aware,
                       pairs_acc_ties_correct=acc.ties_correct)  # fmt: skip
            row["missing"] += dropped
        if truth is not None and t_pairs is not None:
            acc, dropped = _score_pairs(
                index,
                *(t_pairs[c].to_numpy() for c in _PAIR_IDS),
                tol,
                f"scorer {name!r} on the truth pairs",
            )
            row.update(truth_pairs_n=acc.n, truth_acc=acc.tie_aware,
                       truth_acc_ties_correct=acc.ties_correct)  # fmt: skip
            row["missing"] += dropped
            row["spearman"] = spearman_by_prompt(table, truth, prompt_ids)
            row["topk"] = topk_hit_rate(table, truth, k, prompt_ids)
        rows.append(row)
    return EvalTable(rows=rows, split=split, k=k)
