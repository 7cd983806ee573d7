"""Reading and writing community logs: the Parquet layout and its documented schema.

``write_community(logs, out_dir)`` writes ``users.parquet``, ``images.parquet``,
``events/part-NNNNN.parquet``, ``truth/images.parquet``, ``truth/users.parquet``,
``schema.md`` and ``counts.json``; ``read_community`` reads the same layout (truth optional),
so users can bring their own logs in this schema.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rewardkit.io import write_json_atomic, write_parquet_atomic, write_text_atomic
from rewardkit.world.community import CommunityLogs

# table -> [(column, type, required, meaning)]; drives schema.md and read_community's checks.
SCHEMA: dict[str, list[tuple[str, str, bool, str]]] = {
    "users": [
        ("user_id", "int64", True, "account id"),
        ("follower_count", "int64", False, "followers of the account at the end of the window"),
    ],
    "images": [
        ("image_id", "int64", True, "image id (unique)"),
        ("prompt_id", "int64", True, "prompt id; images of one prompt are compared in pairs"),
        ("prompt", "string", True, "the text prompt the image was generated from"),
        ("path", "string", False, "image file, relative to the image pool's folder"),
        ("creator_id", "int64", True, "user_id of the account that posted it"),
        ("posted_at", "timestamp[us, UTC]", True, "when it was posted"),
    ],
    "events": [
        ("event_id", "int64", True, "event id, increasing with (ts, view < like < remix)"),
        ("ts", "timestamp[us, UTC]", True, "when it happened"),
        ("user_id", "int64", True, "who acted"),
        ("image_id", "int64", True, "on which image"),
        ("event_type", "dictionary<int8, string>", True, "'view' (impression), 'like', 'remix'"),
    ],
    "truth/images": [
        ("image_id", "int64", True, "image id"),
        ("prompt_id", "int64", True, "prompt id"),
        ("appeal", "float64", True, "expected remixes per view under uniform exposure"),
        ("appeal_rank_in_prompt", "int32", True, "1 = most appealing image of its prompt"),
        ("expected_views", "float64", False, "mean organic views the biased feed gave it"),
        ("bot_targeted", "bool", False, "its creator is promoted by bots"),
        ("self_remixed", "bool", False, "its creator remixes their own posts"),
    ],
    "truth/users": [
        ("user_id", "int64", True, "account id"),
        ("is_bot", "bool", True, "bot account (never in users or events)"),
        ("is_creator", "bool", True, "account posts images"),
        ("is_self_remixer", "bool", False, "creator who remixes their own posts"),
        ("activity", "float64", False, "explore-feed activity (log-normal)"),
        ("taste_<feature>", "float32", False, "taste weight per appearance feature"),
    ],
}
_FILES = {
    "users": "users.parquet",
    "images": "images.parquet",
    "truth/images": "truth/images.parquet",
    "truth/users": "truth/users.parquet",
}


def schema_markdown() -> str:
    """The ``schema.md`` text: every table and column, for bringing your own logs."""
    lines = [
        "# Community logs: schema",
        "",
        "Bring your own logs in this layout: `users.parquet`, `images.parquet` and",
        "`events/*.parquet` (one or more parts). `truth/` exists only for simulated logs.",
        "Every like or remix of a regular user follows a view of the same (user, image);",
        "bots need not. Extra columns are allowed and passed through. Simulated logs span",
        "`days` from 2024-01-01T00:00Z; reactions to late posts may run minutes past the end.",
        "`event_type` may also be a plain string column. `counts.json` holds the table sizes.",
    ]
    for table, cols in SCHEMA.items():
        name = "events/part-*.parquet" if table == "events" else _FILES[table]
        lines += [
            "",
            f"## {name}",
            "",
            "| column | type | required | meaning |",
            "|---|---|---|---|",
        ]
        lines += [f"| {c} | {t} | {'yes' if r else 'no'} | {m} |" for c, t, r, m in cols]
    lines += [
        "",
        "## What `rewardkit curate` accepts besides these types",
        "",
        "Logs are checked and normalised before any SQL (`src/rewardkit/data/log_schema.py`):",
        "",
        "- Times (`ts`, `posted_at`): any timestamp or date type (no zone: UTC); ISO-8601 text",
        "  with or without a UTC offset (without: UTC), e.g. `2024-01-01T09:30:00Z`; epoch",
        "  numbers, integer, float or text, whose unit each value's magnitude tells: below 1e11",
        "  seconds, below 1e14 milliseconds, below 1e17 microseconds, else nanoseconds (right",
        "  for any time from 1973 to 5138).",
        "- Ids (`user_id`, `image_id`, `prompt_id`, `creator_id`): integers of any width, whole",
        '  floats or text. Text that is a decimal integer is that integer (`"42"` joins `42`,',
        "  and gives the same pairs); other text becomes a stable negative int64 (BLAKE2b,",
        "  `text_id_to_int64`), the same in every table; empty text is a missing id.",
        "- `event_type`: text in any case, spaces trimmed; `view`, `views`, `viewed`,",
        "  `impression`, `impressions` are views; `like`, `likes`, `liked` are likes; `remix`,",
        "  `remixes`, `remixed` are remixes. Anything else (a share or repost creates nothing,",
        "  so it is no remix) is an unknown type.",
        "- Text columns may be string, large_string (pandas 3, polars) or dictionary-encoded.",
        "",
        "Rules, each counted in the dataset card and printed: events without a user, then",
        "without a time, then of an unknown type (named) are dropped; events on images not in",
        "`images.parquet` are counted and never paired; a row repeating an earlier `image_id`",
        "(or `user_id` in `users.parquet`) is dropped, the first row kept; empty `images`",
        "values are an error. Any value that cannot be read stops curation with one line",
        "naming the file, the column and the expected type; so does a curation that leaves no",
        "pair (naming the stage that removed the last rows). An empty val or test split (few",
        "prompts: each prompt goes to one split by a hash of its id) is a warning.",
    ]
    return "\n".join(lines) + "\n"


def write_community(
    logs: CommunityLogs, out_dir: str | Path, rows_per_part: int = 2_000_000
) -> Path:
    """Write logs as Parquet (events in parts) plus ``schema.md``, each file atomically.

    Args:
        logs: the tables to write; truth tables are skipped when None.
        out_dir: destination folder (created if needed).
        rows_per_part: events per ``events/part-NNNNN.parquet`` file.

    Returns:
        The output folder.
    """
    out = Path(out_dir)
    write_parquet_atomic(out / "users.parquet", logs.users)
    write_parquet_atomic(out / "images.parquet", logs.images)
    n_parts = max(1, math.ceil(logs.events.num_rows / rows_per_part))
    names = {f"part-{p:05d}.parquet" for p in range(n_parts)}
    for p in range(n_parts):
        part = logs.events.slice(p * rows_per_part, rows_per_part)
        write_parquet_atomic(out / "events" / f"part-{p:05d}.parquet", part)
    for stale in (out / "events").glob("*.parquet"):  # parts left by a bigger earlier run
        if stale.name not in names:
            stale.unlink()
    for table, name in [("truth/images", "truth_images"), ("truth/users", "truth_users")]:
        if getattr(logs, name) is not None:
            write_parquet_atomic(out / _FILES[table], getattr(logs, name))
        elif (out / _FILES[table]).exists():  # no stale truth beside logs that have none
            (out / _FILES[table]).unlink()
    write_text_atomic(out / "schema.md", schema_markdown())
    counts = {"users": logs.users.num_rows, "images": logs.images.num_rows,
              "events": logs.events.num_rows, "event_parts": n_parts}  # fmt: skip
    write_json_atomic(out / "counts.json", counts)
    return out


def _read_table(path: Path, table: str) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({table} table; see schema.md)")
    data = pq.read_table(path)
    required = [c for c, _, req, _ in SCHEMA[table] if req]
    missing = [c for c in required if c not in data.schema.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} of the {table} table")
    return data


def read_community(in_dir: str | Path) -> CommunityLogs:
    """Read logs written by ``write_community`` (or your own, in the same schema).

    Args:
        in_dir: folder with users.parquet, images.parquet, events/*.parquet and optionally
            truth/images.parquet and truth/users.parquet.

    Returns:
        The logs; truth tables are None when there is no ``truth`` folder.

    Raises:
        FileNotFoundError: naming the missing file or folder.
        ValueError: naming the file and its missing columns.
    """
    d = Path(in_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: community log folder not found")
    users = _read_table(d / "users.parquet", "users")
    images = _read_table(d / "images.parquet", "images")
    parts = sorted((d / "events").glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{d / 'events'}: no event files (expected events/part-*.parquet)")
    events = pa.concat_tables(
        [_read_table(p, "events") for p in parts], promote_options="permissive"
    )
    truth = [None, None]
    if (d / "truth").is_dir():
        truth = [_read_table(d / _FILES[t], t) for t in ("truth/images", "truth/users")]
    return CommunityLogs(users, images, events.unify_dictionaries(), truth[0], truth[1])
