"""Choose an inspector's Recurrent Generation threshold (``loop_threshold`` in its
``config.json``) on a validation run that painted and labelled every attempt.

1. Paint all attempts of validation products (the accept test never passes):
       rewardkit generate --products VAL --out RUN --until-accepted --max-attempts 8 \
           --accept-threshold 0.99999 --inspector MODEL --seed 31
2. Label every attempt (the AdWorld oracle here; annotators' labels elsewhere, as a parquet
   with ``oracle_label`` or ``label`` in the attempts' order):
       rewardkit world label --manifest RUN/attempts.parquet --out LABELS.parquet
3. Replay the loop at every threshold and keep the one that returns a reference-Available
   image for the most products (fewest attempts among ties); ``--write`` stores it:
       python recipes/choose_loop_threshold.py --model MODEL --run RUN --labels LABELS.parquet \
           --max-attempts 8 [--write]

Each attempt's image depends only on (seed, product, attempt), so the replay is what
``generate --until-accepted`` returns on these products at that threshold. The products of
RUN become selection data of MODEL: record them with its training keys.

``replay`` also reports the loop at the model's operating point and at the ``loop_threshold``
it already has: on test products, read those (fixed before the run), not ``chosen`` (which
is fitted to the run).

Another judge on the same run, without painting it again: its verdicts on every attempt
(``rewardkit inspect --model OTHER --input RUN/attempts.parquet --out V.parquet``) replace
the run's own scores, matched by image path (an attempt ``inspect`` skipped leaves its
product out, counted in ``left_out``):
       python recipes/choose_loop_threshold.py --model OTHER --run RUN --labels LABELS.parquet \
           --verdicts V.parquet [--write]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq

from rewardkit.generation.recurrent import attempt_grid, choose_loop_threshold, replay_outcome
from rewardkit.io import write_text_atomic
from rewardkit.models.rfnet import CONFIG_FILE, RFNetConfig

P_AVAILABLE = "p_available"  # the column `rewardkit inspect` writes for Available


def rescored(rows: list[dict], paths: list[str], verdicts: Path) -> list[dict]:
    """``rows`` (the run's attempts, images at ``paths``: absolute or relative to this process)
    with ``score`` = P(Available) from an ``inspect`` output, matched by resolved path; None
    where the verdicts have no row for the attempt."""
    table = pq.read_table(verdicts)
    if not {"path", P_AVAILABLE} <= set(table.column_names):
        raise SystemExit(f"{verdicts}: need path and {P_AVAILABLE} columns (rewardkit inspect)")
    judged = {
        str(Path(p).resolve()): v
        for p, v in zip(table["path"].to_pylist(), table[P_AVAILABLE].to_pylist(), strict=True)
    }
    paths = [str(Path(p).resolve()) for p in paths]
    matched = sum(p in judged for p in paths)
    if matched == 0:
        raise SystemExit(f"{verdicts}: no row matches an attempt's path in the run")
    return [dict(r, score=judged.get(p)) for r, p in zip(rows, paths, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="RFNet folder that judged RUN")
    ap.add_argument("--run", required=True, type=Path, help="generate --out folder")
    ap.add_argument("--labels", required=True, type=Path, help="labels of RUN/attempts.parquet")
    ap.add_argument("--max-attempts", type=int, default=8)
    ap.add_argument(
        "--verdicts",
        type=Path,
        default=None,
        help="`rewardkit inspect` of RUN/attempts.parquet by --model: its P(Available) "
        "replaces the run's scores (default: the run's own judge)",
    )
    ap.add_argument("--write", action="store_true", help="store loop_threshold in the model")
    a = ap.parse_args(argv)
    attempts = pq.read_table(a.run / "attempts.parquet")
    labels = pq.read_table(a.labels)
    column = next((c for c in ("oracle_label", "label") if c in labels.column_names), None)
    if column is None or labels.num_rows != attempts.num_rows:
        raise SystemExit(
            f"{a.labels}: need an oracle_label or label column with one row per attempt "
            f"({attempts.num_rows})"
        )
    config = RFNetConfig.from_folder(a.model)
    rows = attempts.select(["product_id", "attempt", "score"]).to_pylist()
    if a.verdicts is not None:
        paths = [str(a.run / p) for p in attempts["path"].to_pylist()]  # absolute ones stay
        rows = rescored(rows, paths, a.verdicts)
    scores, available, ids, left_out = attempt_grid(
        rows,
        labels[column].to_pylist(),
        a.max_attempts,
    )
    if not ids:
        raise SystemExit(f"{a.run}: no product has all {a.max_attempts} attempts judged")
    choice = choose_loop_threshold(scores, available)
    rows = {
        name: replay_outcome(scores, available, t)
        for name, t in (("operating point", config.accept_threshold),
                        ("its loop threshold", config.loop_threshold),
                        ("chosen", choice["loop_threshold"]))
        if t is not None
    }  # fmt: skip
    ok_all = available.any(1).mean()  # a perfect judge's ceiling on these products
    out = {**choice, "left_out": left_out, "replay": rows, "ceiling": float(ok_all)}
    if a.write:
        new = dataclasses.replace(config, loop_threshold=choice["loop_threshold"])
        write_text_atomic(a.model / CONFIG_FILE, new.to_json())
        out["written"] = str(a.model / CONFIG_FILE)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
