"""Logs as platforms export them: every variant of one simulated log curates to the same pairs
as the canonical log, or fails in one line naming the file and column."""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from rewardkit.data.curation import CurationConfig, curate
from rewardkit.data.log_schema import (
    EVENT_TYPE_SYNONYMS,
    normalise_event_types,
    normalise_ids,
    normalise_times,
    text_id_to_int64,
)
from rewardkit.io import write_parquet_atomic
from rewardkit.world.community_io import schema_markdown
from tests.data.small_community import small_community

Tables = tuple[pa.Table, pa.Table, pa.Table]  # users, images, events
T2024 = 1_704_067_200  # 2024-01-01T00:00Z in seconds
# The creator signal on, so users.parquet (follower counts joined by user_id) matters too.
CONFIG = CurationConfig(creator_signal=dataclasses.replace(CurationConfig().creator_signal,
                                                           enabled=True))  # fmt: skip


@pytest.fixture(scope="module")
def canonical() -> Tables:
    """A small simulated community (20 prompts x 8 images), times floored to whole seconds so
    that epoch seconds and milliseconds spell it exactly."""
    logs = small_community()
    images = _set(logs.images, "posted_at", pc.floor_temporal(logs.images["posted_at"],
                                                              unit="second"))  # fmt: skip
    events = _set(logs.events, "ts", pc.floor_temporal(logs.events["ts"], unit="second"))
    return logs.users, images, events


def _set(t: pa.Table, name: str, values) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, values)


def _write(root: Path, tables: Tables) -> Path:
    users, images, events = tables
    write_parquet_atomic(root / "users.parquet", users)
    write_parquet_atomic(root / "images.parquet", images)
    half = events.num_rows // 2  # two parts: normalising goes part by part
    write_parquet_atomic(root / "events" / "part-00000.parquet", events.slice(0, half))
    write_parquet_atomic(root / "events" / "part-00001.parquet", events.slice(half))
    return root


def _curate(root: Path, config: CurationConfig = CONFIG):
    return curate(root, config, root / "out" / "pairs.parquet")  # paths: "../images/..."


@pytest.fixture(scope="module")
def expected(canonical, tmp_path_factory):
    result = _curate(_write(tmp_path_factory.mktemp("canonical"), canonical))
    pairs = result.pairs
    # A pair table worth comparing: every split, creator-weighted and plain positives.
    assert pairs.num_rows > 100 and all(result.card["pairs_per_split"].values())
    assert set(pairs["weight"].to_pylist()) == {1.0, 1.5}
    assert result.card["notes"] == [] and result.card["warnings"] == []
    return result


# --- the variants -------------------------------------------------------------------------


def _times(tables: Tables, convert: Callable[[pa.ChunkedArray], pa.Array]) -> Tables:
    users, images, events = tables
    return (users, _set(images, "posted_at", convert(images["posted_at"])),
            _set(events, "ts", convert(events["ts"])))  # fmt: skip


def _ids(tables: Tables, convert: Callable[[pa.ChunkedArray], pa.Array]) -> Tables:
    users, images, events = tables
    users = _set(users, "user_id", convert(users["user_id"]))
    for name in ("image_id", "prompt_id", "creator_id"):
        images = _set(images, name, convert(images[name]))
    for name in ("user_id", "image_id"):
        events = _set(events, name, convert(events[name]))
    return users, images, events


def _epoch(t: pa.ChunkedArray, per_second: int) -> pa.Array:
    return pc.divide(t.cast(pa.int64()), 1_000_000 // per_second)


def _text(values: pa.ChunkedArray, kind: pa.DataType | None = None) -> pa.Array:
    return values.cast(pa.string()).cast(kind or pa.string())


def _iso_offset(t: pa.ChunkedArray) -> pa.Array:
    local = pc.add(t, pa.scalar(2 * 3600 * 10**6, pa.duration("us")))  # 02:00 east of UTC
    return pc.binary_join_element_wise(pc.strftime(local, "%Y-%m-%dT%H:%M:%S"), "+02:00", "")


def _event_types(tables: Tables) -> Tables:
    users, images, events = tables
    spelled = {
        "view": ["VIEW", " Impression ", "views", "impressions"],
        "like": ["Like", "LIKES", "liked"],
        "remix": ["Remix", "REMIXED", "remixes"],
    }
    kinds = events["event_type"].cast(pa.string()).to_pylist()
    mixed = [spelled[k][i % len(spelled[k])] for i, k in enumerate(kinds)]
    return users, images, _set(events, "event_type", pa.array(mixed, pa.large_string()))


def _extra_events(tables: Tables, n: int, **change) -> Tables:
    """Append copies of the first n events with some columns changed."""
    users, images, events = tables
    extra = events.slice(0, n)
    for name, values in change.items():
        extra = _set(extra, name, pa.array(values, extra.schema.field(name).type))
    return users, images, pa.concat_tables([events, extra])


def _duplicates(tables: Tables) -> Tables:
    users, images, events = tables
    again = images.slice(0, 5)  # the same ids later in the file, with other values
    again = _set(again, "prompt_id", pa.array([19] * 5, pa.int64()))
    again = _set(again, "path", pa.array(["elsewhere.png"] * 5))
    return pa.concat_tables([users, users.slice(0, 7)]), pa.concat_tables([images, again]), events


def _floats_with_null_users(tables: Tables) -> Tables:
    users, images, events = _ids(tables, lambda v: v.cast(pa.float64()))
    extra = events.slice(0, 4)
    extra = _set(extra, "user_id", pa.array([float("nan"), None, float("nan"), None]))
    return users, images, pa.concat_tables([events, extra])


VARIANTS: dict[str, tuple[Callable[[Tables], Tables], dict]] = {
    "iso-utc": (lambda t: _times(t, lambda v: pc.strftime(v, "%Y-%m-%dT%H:%M:%SZ")), {}),
    "iso-offset-large-string": (
        lambda t: _times(t, lambda v: _iso_offset(v).cast(pa.large_string())),
        {},
    ),  # fmt: skip
    "iso-naive": (lambda t: _times(t, lambda v: pc.strftime(v, "%Y-%m-%d %H:%M:%S")), {}),
    "epoch-s": (lambda t: _times(t, lambda v: _epoch(v, 1)), {}),
    "epoch-ms": (lambda t: _times(t, lambda v: _epoch(v, 1000)), {}),
    "epoch-us-float": (lambda t: _times(t, lambda v: _epoch(v, 10**6).cast(pa.float64())), {}),
    "epoch-ms-text": (lambda t: _times(t, lambda v: _text(_epoch(v, 1000))), {}),
    "timestamp-ns-no-zone": (lambda t: _times(t, lambda v: v.cast(pa.timestamp("ns"))), {}),
    "int32-ids": (lambda t: _ids(t, lambda v: v.cast(pa.int32())), {}),
    "decimal-text-ids": (lambda t: _ids(t, lambda v: _text(v, pa.large_string())), {}),
    "dictionary-text-ids": (lambda t: _ids(t, lambda v: _text(v).dictionary_encode()), {}),
    "float-ids-null-users": (_floats_with_null_users, {"events_no_user": 4}),
    "event-type-synonyms": (_event_types, {}),
    "unknown-types": (
        lambda t: _extra_events(t, 6, event_type=["share", "Click"] * 3),
        {"events_unknown_type": 6},
    ),  # fmt: skip
    "no-time": (lambda t: _extra_events(t, 3, ts=[None] * 3), {"events_no_time": 3}),
    "unknown-images": (
        lambda t: _extra_events(t, 5, image_id=range(10**6, 10**6 + 5)),
        {"events_unknown_image": 5},
    ),  # fmt: skip
    "duplicate-ids": (_duplicates, {"images_duplicate_rows": 5, "users_duplicate_rows": 7}),
}
_RULE_COUNTS = (
    "events_no_user", "events_no_time", "events_unknown_type", "events_unknown_image",
    "images_duplicate_rows", "users_duplicate_rows",
)  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_curates_to_the_canonical_pairs(name, canonical, expected, tmp_path):
    change, counts = VARIANTS[name]
    result = _curate(_write(tmp_path, change(canonical)))
    assert result.pairs.to_pylist() == expected.pairs.to_pylist()
    assert result.pairs.schema == expected.pairs.schema
    assert {k: result.card[k] for k in _RULE_COUNTS} == {k: counts.get(k, 0) for k in _RULE_COUNTS}
    dropped = sum(counts.get(k, 0) for k in _RULE_COUNTS if k.startswith("events_no")
                  or k == "events_unknown_type")  # fmt: skip
    assert result.card["events_valid"] == result.card["events_read"] - dropped
    assert len(result.card["notes"]) >= len(counts)  # each rule that fired is stated
    for key in counts:
        assert any(f"{counts[key]:,} " in note for note in result.card["notes"]), key


def test_unknown_types_are_named_and_formats_recorded(canonical, tmp_path):
    _, counts = VARIANTS["unknown-types"]
    result = _curate(_write(tmp_path, VARIANTS["unknown-types"][0](canonical)))
    assert result.card["unknown_event_types"] == {"share": 3, "click": 3}
    assert any("'share' (3)" in n and "'click' (3)" in n for n in result.card["notes"])
    epoch = _curate(_write(tmp_path / "ms", VARIANTS["epoch-ms"][0](canonical)))
    assert epoch.card["input_formats"]["events ts"] == "epoch numbers (ms, by magnitude)"
    assert "events ts read as epoch numbers (ms, by magnitude)" in epoch.card["notes"]
    md = (tmp_path / "ms" / "out" / "pairs.card.md").read_text()
    assert "## Notes" in md and "epoch numbers (ms" in md


def test_non_numeric_text_ids_give_the_same_pairs_under_hashed_ids(canonical, expected,
                                                                   tmp_path):  # fmt: skip
    users, images, events = canonical
    prefixed = {"image_id": "img-", "prompt_id": "prompt-", "creator_id": "u", "user_id": "u"}

    def spell(t: pa.Table) -> pa.Table:
        for name, prefix in prefixed.items():
            if name in t.column_names:
                text = pc.binary_join_element_wise(prefix, t[name].cast(pa.string()), "")
                t = _set(t, name, text)
        return t

    result = _curate(_write(tmp_path, (spell(users), spell(images), spell(events))))
    keys = ("pos_path", "neg_path", "pos_score", "neg_score", "weight")

    def rows(t: pa.Table) -> list:
        return sorted(zip(*(t[k].to_pylist() for k in keys), strict=True))

    assert rows(result.pairs) == rows(expected.pairs)  # splits follow the hashed prompt ids
    pos = dict(zip(result.pairs["pos_path"].to_pylist(), result.pairs["pos_image_id"].to_pylist(),
                   strict=True))  # fmt: skip
    for path, image_id in pos.items():
        assert image_id == text_id_to_int64(f"img-{Path(path).stem}") < 0


def test_three_prompts_warn_about_empty_splits(canonical, expected, tmp_path, capsys):
    users, images, events = canonical
    split = dict(zip(expected.pairs["prompt_id"].to_pylist(), expected.pairs["split"].to_pylist(),
                     strict=True))  # fmt: skip
    three = sorted(p for p, s in split.items() if s == "train")[:3]
    images = images.filter(pc.is_in(images["prompt_id"], pa.array(three)))
    events = events.filter(pc.is_in(events["image_id"], images["image_id"]))
    root = _write(tmp_path, (users, images, events))
    result = _curate(root)
    assert set(result.pairs["prompt_id"].to_pylist()) == set(three)
    assert set(result.pairs["split"].to_pylist()) == {"train"}  # the split is per prompt
    warnings = result.card["warnings"]
    assert [w.split("'")[1] for w in warnings] == ["val", "test"]
    assert all("3 prompt(s) have pairs (3 in images.parquet)" in w for w in warnings)
    assert "## Warnings" in (root / "out" / "pairs.card.md").read_text()
    out = tmp_path / "cli" / "pairs.parquet"
    assert main(["curate", "--events", str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "rewardkit: warning: split 'val' is empty" in err
    assert "rewardkit: warning: split 'test' is empty" in err


# --- what cannot be read ------------------------------------------------------------------


def _event_part(t: Tables, change: Callable[[pa.Table], pa.Table]) -> Tables:
    return t[0], t[1], change(t[2])


BAD: dict[str, tuple[Callable[[Tables], Tables], str]] = {
    "time-words": (
        lambda t: _event_part(
            t,
            lambda e: _set(
                e,
                "ts",
                pa.array(
                    pc.strftime(e["ts"], "%Y-%m-%dT%H:%M:%SZ").to_pylist()[:-1] + ["yesterday"]
                ),
            ),
        ),
        r"part-00001\.parquet: column 'ts': expected a timestamp, ISO-8601 text or epoch "
        r"seconds/ms/us/ns, got 'yesterday' \(row \d+\)",
    ),  # fmt: skip
    "missing-column": (
        lambda t: _event_part(t, lambda e: e.drop_columns(["ts"])),
        r"part-00000\.parquet: missing column\(s\) \['ts'\] of the events table",
    ),
    "bool-ids": (
        lambda t: (t[0], _set(t[1], "image_id", pc.greater(t[1]["image_id"], 5)), t[2]),
        r"images\.parquet: column 'image_id': expected integer or text ids, got type bool",
    ),
    "fractional-ids": (
        lambda t: (
            _set(t[0], "user_id", pc.divide(t[0]["user_id"].cast(pa.float64()), 3.0)),
            t[1],
            t[2],
        ),
        r"users\.parquet: column 'user_id': expected integer or text ids, got 0\.33",
    ),  # fmt: skip
    "coded-event-types": (
        lambda t: _event_part(
            t,
            lambda e: _set(
                e, "event_type", pc.equal(e["event_type"].cast(pa.string()), "view").cast(pa.int8())
            ),
        ),
        r"part-00000\.parquet: column 'event_type': expected text event types",
    ),  # fmt: skip
    "empty-prompt-ids": (
        lambda t: (
            t[0],
            _set(
                t[1], "prompt_id", pa.array([None] + t[1]["prompt_id"].to_pylist()[1:], pa.int64())
            ),
            t[2],
        ),
        r"images\.parquet: column 'prompt_id': expected a value on every row, got 1 empty",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_log_fails_in_one_line_naming_file_and_column(name, canonical, tmp_path, capsys):
    change, message = BAD[name]
    root = _write(tmp_path / "logs", change(canonical))
    with pytest.raises(ValueError, match=message) as err:
        _curate(root)
    assert "\n" not in str(err.value)
    assert not (root / "out" / "pairs.parquet").exists()
    out = str(tmp_path / "cli.parquet")
    assert main(["curate", "--events", str(root), "--out", out]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("rewardkit: error: ") and not Path(out).exists()


def test_unreadable_parquet_fails_in_one_line(canonical, tmp_path):
    root = _write(tmp_path, canonical)
    (root / "events" / "part-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"part-00001\.parquet: not a readable Parquet file"):
        _curate(root)


def _types(t: Tables, kinds: list[str]) -> Tables:
    n = t[2].num_rows
    return _event_part(t, lambda e: _set(e, "event_type", pa.array((kinds * n)[:n])))


ZERO: dict[str, tuple[Callable[[Tables], Tables], CurationConfig, str]] = {
    "unknown-types": (
        lambda t: _types(t, ["click", "share"]),
        CONFIG,
        r"the log's schema rules dropped every event .*'click'",
    ),  # fmt: skip
    "likes-only": (lambda t: _types(t, ["LIKE"]), CONFIG, r"no 'view' or 'remix' events"),
    "unknown-images": (
        lambda t: _event_part(t, lambda e: _set(e, "image_id", pc.add(e["image_id"], 10**6))),
        CONFIG,
        r"all [\d,]+ events are on images missing from images\.parquet",
    ),  # fmt: skip
    "negatives": (
        lambda t: t,
        dataclasses.replace(CONFIG, min_views_for_negative=10**6),
        r"no image is eligible as a negative \(min_views_for_negative=1000000",
    ),  # fmt: skip
    "margin": (
        lambda t: t,
        dataclasses.replace(CONFIG, margin=1e6),
        r"no candidate pairs: .*margin=1000000\.0",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(ZERO))
def test_zero_pairs_fail_naming_the_stage(name, canonical, tmp_path, capsys):
    change, config, message = ZERO[name]
    root = _write(tmp_path / "logs", change(canonical))
    with pytest.raises(ValueError, match=rf"logs: 0 pairs, nothing written: {message}") as err:
        _curate(root, config)
    assert "\n" not in str(err.value)
    assert not (root / "out").exists() or not any((root / "out").iterdir())
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"margin: {config.margin}\nmin_views_for_negative: "
                     f"{config.min_views_for_negative}\n")  # fmt: skip
    out = tmp_path / "cli" / "pairs.parquet"
    argv = ["curate", "--events", str(root), "--config", str(rules), "--out", str(out)]
    assert main(argv) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "0 pairs, nothing written" in err_text
    assert not out.exists()


# --- the column rules on their own --------------------------------------------------------


@pytest.mark.parametrize(
    "value, unit",
    [(T2024, "s"), (T2024 * 10**3 + 7, "ms"), (T2024 * 10**6 + 7, "us"),
     (T2024 * 10**9 + 7_000, "ns"), (100_000_000, "s"), (100_000_000_000, "ms")],
)  # fmt: skip
def test_epoch_unit_by_magnitude(value, unit):
    times, how = normalise_times(pa.array([value, None]), "f: column 'ts'")
    assert how == f"epoch numbers ({unit}, by magnitude)"
    per_us = {"s": 10**6, "ms": 10**3, "us": 1}
    expect = value // 1000 if unit == "ns" else value * per_us[unit]
    assert times.cast(pa.int64()).to_pylist() == [expect, None]


def test_text_times_with_offsets_and_fractions():
    text = pa.array(["2024-01-01T02:00:00.123456789+02:00", "2024-01-01T00:00:00Z", None, " "])
    times, _ = normalise_times(text, "f: column 'ts'")
    us = T2024 * 10**6
    assert times.cast(pa.int64()).to_pylist() == [us + 123456, us, None, None]


def test_text_ids_and_their_hash():
    big = str(2**63 - 1)
    ids, _ = normalise_ids(pa.array(["42", " 007", "+5", "-3", "", None, big, big + "0", "ab"]),
                           "f: column 'user_id'")  # fmt: skip
    assert ids.to_pylist() == [42, 7, 5, -3, None, None, 2**63 - 1,
                               text_id_to_int64(big + "0"), text_id_to_int64("ab")]  # fmt: skip
    assert text_id_to_int64("ab") == -2451145266060678276  # stable across runs and versions
    assert -(2**62) <= text_id_to_int64("x") < 0 and text_id_to_int64("x") != text_id_to_int64("y")


def test_event_type_synonyms_are_documented_in_schema_md():
    kinds, low = normalise_event_types(pa.array(["Impression", "REMIXED", "repost", None]), "f")
    assert kinds.to_pylist() == ["view", "remix", None, None]
    assert low.to_pylist() == ["impression", "remixed", "repost", None]
    doc = schema_markdown()
    assert all(f"`{word}`" in doc for word in EVENT_TYPE_SYNONYMS)
    assert "epoch" in doc and "ISO-8601" in doc and "image_id" in doc


def test_large_string_text_columns(canonical, expected, tmp_path):
    users, images, events = canonical
    for name in ("prompt", "path"):
        images = _set(images, name, images[name].cast(pa.large_string()))
    result = _curate(_write(tmp_path, (users, images, events)))
    assert result.pairs.to_pylist() == expected.pairs.to_pylist()
    assert pq.read_schema(tmp_path / "images.parquet").field("prompt").type == pa.large_string()
