"""Schema check and normalisation of community logs, before any curation SQL runs.

Platforms export logs in many shapes. ``normalise_log`` reads ``users.parquet``,
``images.parquet`` and ``events/*.parquet`` (the layout of ``world/community_io.py``), checks
every column curation reads and writes canonical copies (ids int64, times timestamp[us, UTC],
event types 'view' | 'like' | 'remix', text as string) that the SQL then reads. Accepted:

- times (``ts``, ``posted_at``): a timestamp or date type (one without a zone is UTC);
  ISO-8601 text, with or without a UTC offset (without: UTC); epoch numbers (integer, float,
  or as text). Each number's unit comes from its magnitude: |x| < 1e11 seconds, < 1e14
  milliseconds, < 1e17 microseconds, else nanoseconds, which reads any time between 1973 and
  5138 right in any of these units.
- ids (``user_id``, ``image_id``, ``prompt_id``, ``creator_id``): integers of any width and
  sign, whole floats, decimals or text. Text that is a decimal integer within int64 is that
  integer (so "42" joins 42 and a log gives the same pairs whichever way it spells its ids);
  other text maps to a stable negative int64 (``text_id_to_int64``: BLAKE2b, so a string id
  is the same number in every table and run); empty text is a missing id.
- event types: text in any case, surrounding spaces ignored, with the synonyms of
  ``EVENT_TYPE_SYNONYMS`` (e.g. 'impression' is a view). A share or repost is not a remix (it
  creates nothing), so it stays unknown.
- text: string, large_string (pandas 3, polars) or dictionary-encoded columns.

Rules, each counted in the dataset card: an event without a user, else without a time, else of
an unknown type is dropped (counted under the first that applies; unknown types by name); an
event whose image is missing or not in images.parquet is counted by the SQL and never joins;
an images.parquet row repeating an earlier image_id is dropped (the first row is kept); a
users.parquet row without a user_id or repeating one is dropped. Every other value that cannot
be read raises ``ValueError`` with one line naming the file, the column and what was expected.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TIME = pa.timestamp("us", tz="UTC")
EVENT_TYPES = ("view", "like", "remix")
# Accepted spellings (after lower-casing and trimming) -> canonical event type.
EVENT_TYPE_SYNONYMS: dict[str, str] = {
    "view": "view", "views": "view", "viewed": "view",
    "impression": "view", "impressions": "view",
    "like": "like", "likes": "like", "liked": "like",
    "remix": "remix", "remixes": "remix", "remixed": "remix",
}  # fmt: skip
REQUIRED: dict[str, tuple[str, ...]] = {
    "events": ("event_id", "ts", "user_id", "image_id", "event_type"),
    "images": ("image_id", "prompt_id", "prompt", "path", "creator_id", "posted_at"),
    "users": ("user_id",),
}
_EXPECT_TIME = "a timestamp, ISO-8601 text or epoch seconds/ms/us/ns"
_EXPECT_ID = "integer or text ids"
_BATCH_ROWS = 1 << 20  # events are normalised in batches of this many rows
_NUMERIC_ID = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1


@dataclass
class NormalisedLog:
    """Canonical copies of a log (for the SQL) and what normalising it counted."""

    root: Path  # the log folder; image paths are relative to it
    users: Path
    images: Path
    events: Path
    counts: dict[str, int] = field(default_factory=dict)
    unknown_event_types: dict[str, int] = field(default_factory=dict)
    events_per_type: dict[str, int] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)  # "file column" -> how it was read


def locate_log(events_dir: str | Path, need_followers: bool) -> tuple[Path, list[Path]]:
    """The log root (with images.parquet) and its event files; checks files and columns.

    Args:
        events_dir: the log folder or its ``events`` subfolder.
        need_followers: whether users.parquet must have ``follower_count``.

    Returns:
        (root, sorted event files).

    Raises:
        FileNotFoundError: naming a missing folder or file.
        ValueError: naming a file and its missing column(s), or an unreadable file.
    """
    d = Path(events_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: event log folder not found")
    if not (d / "events").is_dir() and (d.parent / "images.parquet").is_file():
        d = d.parent  # given the events/ folder itself
    parts = sorted((d / "events").glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{d / 'events'}: no event files (expected events/*.parquet)")
    for name in ("images", "users"):
        if not (d / f"{name}.parquet").is_file():
            raise FileNotFoundError(f"{d / f'{name}.parquet'}: missing ({name} table)")
        _check_columns(d / f"{name}.parquet", name)
    for p in parts:
        _check_columns(p, "events")
    if need_followers and "follower_count" not in _schema(d / "users.parquet").names:
        raise ValueError(
            f"{d / 'users.parquet'}: missing column 'follower_count' (needed by creator_signal)"
        )
    return d, parts


def _schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_columns(path: Path, table: str) -> None:
    names = _schema(path).names
    missing = [c for c in REQUIRED[table] if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} of the {table} table")


# --- one column at a time ------------------------------------------------------------------


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _decoded(values: pa.Array) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    return values


def _trimmed_text(values: pa.Array) -> pa.Array:
    """Text as string with surrounding spaces removed; empty text becomes null."""
    s = pc.utf8_trim_whitespace(values.cast(pa.string()))
    return pc.if_else(pc.equal(s, ""), pa.scalar(None, pa.string()), s)


def normalise_times(values: pa.Array, where: str, first_row: int = 0) -> tuple[pa.Array, str]:
    """Times of any accepted form as timestamp[us, UTC] (see the module docstring).

    Args:
        values: the column (one batch).
        where: ``"<file>: column '<name>'"``, the start of any error message.
        first_row: the file row of ``values[0]``, for error messages.

    Returns:
        (times, how they were read).

    Raises:
        ValueError: one line naming ``where``, the expected forms and the first bad value.
    """
    values = _decoded(values)
    t = values.type
    if pa.types.is_timestamp(t):
        zone = t.tz or "no zone: UTC"
        return values.cast(pa.timestamp(t.unit, tz=t.tz or "UTC")).cast(TIME, safe=False), (
            f"timestamp[{t.unit}, {zone}]"
        )
    if pa.types.is_date(t):
        return values.cast(pa.timestamp("s")).cast(TIME), "date (midnight UTC)"
    if pa.types.is_null(t):
        return values.cast(TIME), "all null"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return _epoch_to_times(values, where)
    if _is_text(t):
        return _text_to_times(_trimmed_text(values), where, first_row)
    raise ValueError(f"{where}: expected {_EXPECT_TIME}, got type {t}")


def _epoch_to_times(values: pa.Array, where: str) -> tuple[pa.Array, str]:
    valid = ~np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_floating(values.type):
        v = values.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.isfinite(v).all():
            raise ValueError(f"{where}: expected {_EXPECT_TIME}, got a non-finite number")
    else:
        if pa.types.is_uint64(values.type) and (pc.max(values).as_py() or 0) > _INT64_MAX:
            raise ValueError(f"{where}: expected {_EXPECT_TIME}, got a number past int64")
        v = values.fill_null(0).cast(pa.int64()).to_numpy(zero_copy_only=False)
    unit = np.select([np.abs(v) < 1e11, np.abs(v) < 1e14, np.abs(v) < 1e17], [0, 1, 2], 3)
    if v.dtype.kind == "f":
        scale = np.array([1e6, 1e3, 1.0, 1e-3])[unit]
        us = np.round(v * scale)
        if np.abs(us).max(initial=0.0) > 9e18:
            raise ValueError(f"{where}: expected {_EXPECT_TIME}, got a number past int64")
        us = us.astype(np.int64)
    else:  # integer arithmetic: exact for every unit
        with np.errstate(over="ignore"):
            us = np.choose(unit, [v * 1_000_000, v * 1_000, v, v // 1_000])
    found = [("s", "ms", "us", "ns")[k] for k in np.unique(unit[valid])]
    times = pa.array(us, pa.int64(), mask=~valid).cast(TIME)
    return times, f"epoch numbers ({', '.join(found) or 'none'}, by magnitude)"


_TEXT_TIME_TRIES = (
    (pa.timestamp("us", tz="UTC"), "ISO-8601 text with UTC offset"),
    (pa.timestamp("ns", tz="UTC"), "ISO-8601 text with UTC offset"),
    (pa.timestamp("us"), "ISO-8601 text without offset (UTC)"),
    (pa.timestamp("ns"), "ISO-8601 text without offset (UTC)"),
)


def _text_to_times(s: pa.Array, where: str, first_row: int) -> tuple[pa.Array, str]:
    for target, how in _TEXT_TIME_TRIES:
        try:
            parsed = s.cast(target)
        except pa.ArrowInvalid:
            continue
        return parsed.cast(pa.timestamp(target.unit, tz="UTC")).cast(TIME, safe=False), how
    for number in (pa.int64(), pa.float64()):
        try:
            times, how = _epoch_to_times(s.cast(number), where)
        except pa.ArrowInvalid:
            continue
        return times, how.replace("epoch numbers", "epoch numbers as text")
    for row, v in enumerate(s.to_pylist()):
        if v is not None and not _reads_as_time(v):
            got = v if len(v) <= 40 else v[:40] + "..."
            raise ValueError(
                f"{where}: expected {_EXPECT_TIME}, got {got!r} (row {first_row + row})"
            )
    raise ValueError(
        f"{where}: expected {_EXPECT_TIME} in one form per column, got a mix of ISO-8601 text "
        "with and without UTC offsets or epoch numbers"
    )


def _reads_as_time(v: str) -> bool:
    try:
        datetime.fromisoformat(v)
        return True
    except ValueError:
        pass
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


def _whole(v: float) -> bool:
    try:
        return v == int(v) and abs(int(v)) <= _INT64_MAX
    except (OverflowError, ValueError):
        return False


def text_id_to_int64(text: str) -> int:
    """The stable int64 of a non-numeric text id: minus one minus the top 62 bits of its
    8-byte BLAKE2b digest, so in [-2^62, -1] (numeric ids are mostly non-negative)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return -1 - (int.from_bytes(digest, "little") >> 2)


def _text_id(v: str) -> int:
    if _NUMERIC_ID.fullmatch(v) and -_INT64_MAX - 1 <= int(v) <= _INT64_MAX:
        return int(v)
    return text_id_to_int64(v)


def normalise_ids(values: pa.Array, where: str) -> tuple[pa.Array, str]:
    """Ids of any accepted form as int64 (see the module docstring); nulls stay null.

    Args:
        values: the column (one batch).
        where: ``"<file>: column '<name>'"``, the start of any error message.

    Returns:
        (int64 ids, how they were read).

    Raises:
        ValueError: one line naming ``where`` and the expected types.
    """
    values = _decoded(values)
    t = values.type
    if pa.types.is_null(t):
        return values.cast(pa.int64()), "all null"
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t) and (pc.max(values).as_py() or 0) > _INT64_MAX:
            raise ValueError(f"{where}: expected {_EXPECT_ID} within int64, got a larger number")
        return values.cast(pa.int64()), str(t)
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        if pa.types.is_floating(t):  # NaN is how some writers spell a missing number
            values = pc.if_else(pc.is_nan(values), pa.scalar(None, t), values)
        try:
            return values.cast(pa.int64()), f"whole numbers ({t})"
        except pa.ArrowInvalid:
            bad = next((v for v in values.to_pylist() if v is not None and not _whole(v)), None)
            got = "a number past int64" if bad is None else repr(bad)
            raise ValueError(f"{where}: expected {_EXPECT_ID}, got {got}") from None
    if not _is_text(t):
        raise ValueError(f"{where}: expected {_EXPECT_ID}, got type {t}")
    s = _trimmed_text(values)
    short = pc.match_substring_regex(s, r"^-?0*[0-9]{1,18}$")  # always fits int64
    ids = pc.if_else(short, s, pa.scalar(None, pa.string())).cast(pa.int64())
    others = pc.unique(pc.if_else(short, pa.scalar(None, pa.string()), s).drop_null())
    if len(others) == 0:
        return ids, "decimal text"
    mapped = pa.array([_text_id(v) for v in others.to_pylist()], pa.int64())
    ids = pc.coalesce(ids, pc.take(mapped, pc.index_in(s, value_set=others)))
    return ids, "text (non-numeric ids hashed by text_id_to_int64)"


def normalise_event_types(values: pa.Array, where: str) -> tuple[pa.Array, pa.Array]:
    """Event types as 'view' | 'like' | 'remix' (null when unknown or missing).

    Args:
        values: the column (one batch).
        where: ``"<file>: column '<name>'"``, the start of any error message.

    Returns:
        (canonical types, the lower-cased trimmed text as read, for naming unknown types).

    Raises:
        ValueError: one line naming ``where`` if the column is not text.
    """
    values = _decoded(values)
    if pa.types.is_null(values.type):
        values = values.cast(pa.string())
    if not _is_text(values.type):
        raise ValueError(f"{where}: expected text event types {list(EVENT_TYPES)}, "
                         f"got type {values.type}")  # fmt: skip
    low = pc.utf8_lower(_trimmed_text(values))
    keys = pa.array(list(EVENT_TYPE_SYNONYMS))
    canonical = pa.array(list(EVENT_TYPE_SYNONYMS.values()))
    return pc.take(canonical, pc.index_in(low, value_set=keys)), low


def _text(values: pa.Array, where: str) -> tuple[pa.Array, str]:
    values = _decoded(values)
    if pa.types.is_null(values.type) or _is_text(values.type):
        return values.cast(pa.string()), "text"
    raise ValueError(f"{where}: expected text, got type {values.type}")


# --- whole tables -------------------------------------------------------------------------


def _read(path: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


def _note(formats: dict[str, str], key: str, how: str) -> None:
    if how not in formats.get(key, "").split("; "):
        formats[key] = f"{formats[key]}; {how}" if key in formats else how


def _first_of_each(ids: pa.Array) -> np.ndarray:
    """Row indices of the first row of every distinct non-null id, in file order."""
    v = ids.to_numpy(zero_copy_only=False)
    _, first = np.unique(v, return_index=True)
    return np.sort(first)


def _normalise_images(path: Path, log: NormalisedLog) -> pa.Table:
    t = _read(path, list(REQUIRED["images"]))
    cols: dict[str, pa.Array] = {}
    for name in REQUIRED["images"]:
        where = f"{path}: column '{name}'"
        if name in ("prompt", "path"):
            col, how = _text(t[name], where)
        elif name == "posted_at":
            col, how = normalise_times(t[name], where)
        else:
            col, how = normalise_ids(t[name], where)
        if col.null_count:
            raise ValueError(f"{where}: expected a value on every row, got {col.null_count} "
                             "empty")  # fmt: skip
        cols[name] = col
        _note(log.formats, f"images.parquet {name}", how)
    cols["posted_s"] = epoch_seconds(cols["posted_at"])
    images = pa.table(cols)
    keep = _first_of_each(images["image_id"])
    log.counts["images_read"] = images.num_rows
    log.counts["images_duplicate_rows"] = images.num_rows - len(keep)
    return images.take(keep) if len(keep) < images.num_rows else images


def _normalise_users(path: Path, log: NormalisedLog, need_followers: bool) -> pa.Table:
    t = _read(path, ["user_id", "follower_count"] if need_followers else ["user_id"])
    ids, how = normalise_ids(t["user_id"], f"{path}: column 'user_id'")
    _note(log.formats, "users.parquet user_id", how)
    cols = {"user_id": ids}
    if need_followers:
        where, f = f"{path}: column 'follower_count'", _decoded(t["follower_count"])
        try:
            cols["follower_count"] = f.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ValueError(f"{where}: expected numbers, got type {f.type}") from None
    users = pa.table(cols)
    log.counts["users_read"] = users.num_rows
    log.counts["users_no_id"] = ids.null_count
    users = users.filter(ids.is_valid())
    keep = _first_of_each(users["user_id"])
    log.counts["users_duplicate_rows"] = users.num_rows - len(keep)
    return users.take(keep) if len(keep) < users.num_rows else users


def _batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's batches; a read error (not one of normalising) becomes one line."""
    try:
        yield from pq.ParquetFile(path).iter_batches(_BATCH_ROWS, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None


# ts_s / posted_s: the times as float seconds since the epoch, computed here once, so that
# every SQL engine reads the same numbers (engines' own EXTRACT(EPOCH ...) differ).
_EVENT_SCHEMA = pa.schema(
    [("ts", TIME), ("user_id", pa.int64()), ("image_id", pa.int64()), ("event_type", pa.string()),
     ("ts_s", pa.float64())]
)  # fmt: skip


def epoch_seconds(times: pa.Array) -> pa.Array:
    """Canonical (UTC, microsecond) timestamps as float64 seconds since the epoch."""
    return pc.divide(pc.cast(pc.cast(times, pa.timestamp("us", "UTC")), pa.int64()), 1_000_000.0)


def _normalise_events(parts: list[Path], out: Path, log: NormalisedLog) -> None:
    counts = Counter({"events_read": 0, "events_no_user": 0, "events_no_time": 0,
                      "events_unknown_type": 0})  # fmt: skip
    unknown: Counter[str] = Counter()
    per_type: Counter[str] = Counter({k: 0 for k in EVENT_TYPES})
    with pq.ParquetWriter(out, _EVENT_SCHEMA) as writer:
        for path in parts:
            row = 0
            for b in _batches(path, ["ts", "user_id", "image_id", "event_type"]):
                _normalise_batch(b, path, row, writer, counts, unknown, per_type, log)
                row += b.num_rows
    log.counts.update(counts)
    log.counts["events_valid"] = counts["events_read"] - sum(
        counts[k] for k in ("events_no_user", "events_no_time", "events_unknown_type")
    )
    log.unknown_event_types = dict(unknown.most_common())
    log.events_per_type = dict(per_type)


def _normalise_batch(
    b: pa.RecordBatch, path: Path, row: int, writer: pq.ParquetWriter, counts: Counter,
    unknown: Counter, per_type: Counter, log: NormalisedLog,
) -> None:  # fmt: skip
    where = f"{path}: column"
    user, how = normalise_ids(b.column("user_id"), f"{where} 'user_id'")
    _note(log.formats, "events user_id", how)
    image, how = normalise_ids(b.column("image_id"), f"{where} 'image_id'")
    _note(log.formats, "events image_id", how)
    ts, how = normalise_times(b.column("ts"), f"{where} 'ts'", row)
    _note(log.formats, "events ts", how)
    kind, low = normalise_event_types(b.column("event_type"), f"{where} 'event_type'")
    has_user, has_time = user.is_valid(), ts.is_valid()
    no_time = pc.and_(has_user, pc.invert(has_time))
    known = pc.and_(pc.and_(has_user, has_time), kind.is_valid())
    unknown_rows = pc.and_(pc.and_(has_user, has_time), kind.is_null())
    counts["events_read"] += b.num_rows
    counts["events_no_user"] += user.null_count
    counts["events_no_time"] += pc.sum(no_time).as_py() or 0
    counts["events_unknown_type"] += pc.sum(unknown_rows).as_py() or 0
    names = pc.fill_null(low.filter(unknown_rows), "<missing>")
    for item in pc.value_counts(names).to_pylist():
        unknown[item["values"]] += item["counts"]
    kept = pa.record_batch([ts, user, image, kind, epoch_seconds(ts)], schema=_EVENT_SCHEMA).filter(
        known
    )
    for item in pc.value_counts(kept["event_type"]).to_pylist():
        per_type[item["values"]] += item["counts"]
    writer.write_batch(kept)


def normalise_log(
    root: Path, parts: list[Path], work_dir: Path, need_followers: bool = False
) -> NormalisedLog:
    """Check a log and write its canonical copy into ``work_dir`` (see the module docstring).

    Args:
        root: the log folder (from ``locate_log``).
        parts: its event files.
        work_dir: an existing folder for ``users.parquet``, ``images.parquet`` and
            ``events.parquet`` in the canonical schema.
        need_followers: also normalise ``users.parquet``'s follower_count.

    Returns:
        Where the copies are, and the counts, event types and formats seen.

    Raises:
        ValueError: one line naming the file, column and expected type of a value that
            cannot be read.
    """
    log = NormalisedLog(root, work_dir / "users.parquet", work_dir / "images.parquet",
                        work_dir / "events.parquet")  # fmt: skip
    pq.write_table(_normalise_images(root / "images.parquet", log), log.images)
    pq.write_table(_normalise_users(root / "users.parquet", log, need_followers), log.users)
    _normalise_events(parts, log.events, log)
    return log
