"""Curation: community event logs -> preference pairs (the Social Reward format).

``curate(events_dir, config, out_path)`` reads a log folder in the community schema
(``users.parquet``, ``images.parquet``, ``events/*.parquet``; see ``world/community_io.py``),
checks and normalises it (``data/log_schema.py``: times, ids and event types as platforms
export them, duplicate images, events without a user, unknown event types) and runs five SQL
stages with DuckDB (``data/sql/curation_*.sql``, portable SQL: CTEs, window
functions, integer hashes, so a cluster engine can run the same text):

1. user behaviour -> suspected bots (event rate, remixes per view, remixes without a prior
   view, seconds from post to remix; flags come from behaviour, never from a truth column),
2. events without bots and without creators' events on their own posts,
3. one score per image: remixes per view with a prior (exposure-normalised) or the raw count,
4. candidate pairs within a prompt and time window (top-K positives x bottom-K negatives),
5. a capped, hashed sample per prompt, weights and a train/val/test split per prompt.

It writes the pairs as Parquet and a dataset card (``<stem>.card.json`` and ``.card.md``)
with the count after every stage, notes on every rule that changed the log and warnings (an
empty split). A curation that leaves no pair raises ``ValueError`` naming the stage that
removed the last rows, and writes nothing. ``truth/`` is never read; ``pair_truth_accuracy`` takes
the truth from its caller, for evaluation only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from rewardkit.data.log_schema import (
    EVENT_TYPE_SYNONYMS,
    NormalisedLog,
    locate_log,
    normalise_log,
)
from rewardkit.io import write_json_atomic, write_text_atomic

_BIG = 10**15  # stands for "no limit" inside SQL
SIGNALS = ("remix_rate", "remix_count")
SPLITS = ("train", "val", "test")


@dataclass
class BotRules:
    """Behavioural bot detection: an account is flagged when it has ``min_remixes`` remixes
    (on others' posts) and at least ``min_signals`` of the four signals fire."""

    enabled: bool = True
    min_remixes: int = 3  # fewer remixes say too little about an account
    min_signals: int = 2  # two independent signs: one alone fires for some keen humans
    max_events_per_hour: int = 60  # a human rarely acts more than once a minute for an hour
    max_remix_per_view: float = 0.8  # humans remix a small share of what they see
    max_remix_without_view_share: float = 0.2  # a human remix follows a view of the image
    min_median_seconds_post_to_remix: float = 900.0  # bots pounce minutes after posting

    def __post_init__(self) -> None:
        _validate(self, "bots")


@dataclass
class CreatorSignal:
    """Positives remixed by top creators (by follower count) get a weight bonus."""

    enabled: bool = False  # off by default: follower counts are themselves exposure-biased
    top_quantile: float = 0.9  # top 10% of accounts with followers count as top creators
    weight_bonus: float = 0.5  # weight 1.5 for such positives

    def __post_init__(self) -> None:
        _validate(self, "creator_signal")


@dataclass
class Splits:
    """Split fractions; each prompt goes to exactly one split, by a hash of prompt_id."""

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0  # also seeds the per-prompt pair sample

    def __post_init__(self) -> None:
        _validate(self, "splits")


@dataclass
class CurationConfig:
    """Rules of curation; every default carries its reason. ``curation_naive.yaml`` turns every
    bias correction off (raw remix counts), ``curation_default.yaml`` spells these defaults."""

    bots: BotRules = field(default_factory=BotRules)
    exclude_self_remix: bool = True  # creators' own views/remixes of their posts are not votes
    signal: str = "remix_rate"  # remixes per view (exposure-normalised) or "remix_count"
    distinct_users: bool = True  # collective feedback: one vote per user and image
    prior_views: float = 20.0  # pseudo-views at the global rate: low-exposure rates shrink
    min_remixes_for_positive: int = 1  # a positive was remixed at least once
    min_views_for_positive: int = 0
    min_views_for_negative: int = 20  # a negative had the chance to be remixed
    max_remixes_for_negative: int | None = None  # None: any count (ranked by score)
    creator_signal: CreatorSignal = field(default_factory=CreatorSignal)
    time_window_days: float | None = 14.0  # compare posts of similar age (feeds, trends)
    margin: float = 0.03  # min score gap: remix-rate differences below 3 points are noise
    max_candidates_per_prompt: int = 64  # top-K positives x bottom-K negatives per prompt
    max_pairs_per_prompt: int | None = 100  # no prompt dominates the pairs
    splits: Splits = field(default_factory=Splits)

    def __post_init__(self) -> None:
        _validate(self, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CurationConfig:
        """Read a config from YAML; missing keys take the defaults.

        Args:
            path: a YAML file with a mapping of CurationConfig fields (nested mappings for
                ``bots``, ``creator_signal`` and ``splits``).

        Returns:
            The validated config.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: naming the file and key, for an unknown key or a bad value.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: curation config not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from None
        try:
            return _build(cls, {} if raw is None else raw, "")
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what the dataset card records)."""
        return dataclasses.asdict(self)


# Valid values per field: (type, low, high, nullable); bool fields are (bool, None, None, False).
_RULES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "enabled": (bool, None, None, False), "exclude_self_remix": (bool, None, None, False),
    "distinct_users": (bool, None, None, False), "min_remixes": (int, 0, _BIG, False),
    "min_signals": (int, 1, 4, False), "max_events_per_hour": (int, 1, _BIG, False),
    "max_remix_per_view": (float, 0.0, 1e6, False),
    "max_remix_without_view_share": (float, 0.0, 1.0, False),
    "min_median_seconds_post_to_remix": (float, 0.0, 1e9, False),
    "top_quantile": (float, 0.0, 1.0, False), "weight_bonus": (float, 0.0, 1e3, False),
    "train": (float, 0.0, 1.0, False), "val": (float, 0.0, 1.0, False),
    "test": (float, 0.0, 1.0, False), "seed": (int, 0, 2**31 - 2, False),
    "prior_views": (float, 0.0, 1e9, False), "min_remixes_for_positive": (int, 0, _BIG, False),
    "min_views_for_positive": (int, 0, _BIG, False),
    "min_views_for_negative": (int, 0, _BIG, False),
    "max_remixes_for_negative": (int, 0, _BIG, True), "time_window_days": (float, 0, 1e5, True),
    "margin": (float, 0.0, 1e12, False), "max_candidates_per_prompt": (int, 1, 100_000, False),
    "max_pairs_per_prompt": (int, 1, _BIG, True),
}  # fmt: skip


def _validate(obj: Any, where: str) -> None:
    for f in dataclasses.fields(obj):
        v, key = getattr(obj, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(v):
            continue  # nested configs validate themselves
        if f.name == "signal":
            if v not in SIGNALS:
                raise ValueError(f"{key}: expected one of {list(SIGNALS)}, got {v!r}")
            continue
        kind, lo, hi, nullable = _RULES[f.name]
        if v is None and nullable:
            continue
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{key}: expected true or false, got {v!r}")
            continue
        ok = isinstance(v, int) if kind is int else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or not lo <= v <= hi:  # NaN fails lo <= v
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"{key}: expected {what} in [{lo}, {hi}], got {v!r}")
    if isinstance(obj, Splits) and not math.isclose(obj.train + obj.val + obj.test, 1.0):
        raise ValueError(f"{where}: train + val + test must be 1, got {obj!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(f"{prefix}{key}: unknown key (expected one of {sorted(names)})")
        sub = _NESTED.get(key) if cls is CurationConfig else None
        if sub is not None:
            value = _build(sub, value, f"{key}.")
        elif _RULES.get(key, (None,))[0] is float and type(value) is int:
            value = float(value)
        kwargs[key] = value
    return cls(**kwargs)  # validates; errors name "key" or "section.key"


_NESTED: dict[str, type] = {"bots": BotRules, "creator_signal": CreatorSignal, "splits": Splits}


@dataclass
class CurationResult:
    """What ``curate`` returns: where the pairs are, and the dataset card. ``pairs`` reads
    them (as written; a Spark run's partitioned folder as one table) on first use."""

    out: Path
    card: dict[str, Any]
    _pairs: pa.Table | None = None

    @property
    def pairs(self) -> pa.Table:
        if self._pairs is None:
            self._pairs = read_pairs(self.out)
        return self._pairs


def read_pairs(path: str | os.PathLike) -> pa.Table:
    """Pairs as ``curate`` wrote them: one Parquet file (DuckDB) or a folder partitioned by
    ``split`` (Spark), as one table with the columns and types of the pair schema."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        import pyarrow.dataset as ds

        table = ds.dataset(path, format="parquet", partitioning="hive").to_table()
    else:
        table = pq.read_table(path)
    if "split" in table.column_names and pa.types.is_dictionary(table["split"].type):
        table = table.set_column(
            table.schema.get_field_index("split"), "split", table["split"].cast(pa.string())
        )
    return table


def _sql(name: str, **params: Any) -> str:
    text = resources.files("rewardkit.data").joinpath(f"sql/{name}.sql").read_text("utf-8")
    return Template(text).substitute({k: _literal(v) for k, v in params.items()})


def _literal(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):  # DOUBLE in every engine (a bare 0.5 is DECIMAL in Spark)
        return f"CAST({repr(v) if math.isfinite(v) else _BIG} AS DOUBLE)"
    return str(v)


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def curate(
    events_dir: str | os.PathLike,
    config: CurationConfig,
    out_path: str | os.PathLike,
    engine: str = "duckdb",
    spark_master: str | None = None,
) -> CurationResult:
    """Curate community event logs into preference pairs and write them with a dataset card.

    Args:
        events_dir: the log folder (``users.parquet``, ``images.parquet``,
            ``events/*.parquet``), or its ``events`` subfolder.
        config: the curation rules.
        out_path: the output: one Parquet file (``duckdb``) or a Parquet folder partitioned
            by ``split`` (``spark``); ``<stem>.card.json`` and ``<stem>.card.md`` are
            written beside it.
        engine: ``duckdb`` (embedded) or ``spark`` (``data/engines.py``): the same SQL.
        spark_master: the Spark master URL (``local[2]``, ``spark://host:7077``); None:
            this machine, or the master ``spark-submit`` set.

    Returns:
        Where the pairs are (columns prompt, pos_path, neg_path, prompt_id, pos_image_id,
        neg_image_id, pos_score, neg_score, weight, split; paths relative to the output's
        folder) and the card (counts per stage).

    Raises:
        FileNotFoundError: naming a missing folder or file.
        ValueError: one line naming a file and its missing column(s) or a value that cannot be
            read (file, column, expected type); or, when no pair is left, the stage that
            removed the last rows (nothing is written then).
        EngineUnavailable: ``spark`` without Java or pyspark (a ValueError: one line saying
            what to install).
    """
    from rewardkit.data.engines import make_engine

    cfg, start = config, time.perf_counter()
    need_followers = cfg.creator_signal.enabled
    root, parts = locate_log(events_dir, need_followers)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Paths relative to the output's folder, so the pairs open their images from anywhere.
    image_root = root.resolve()
    prefix = os.path.relpath(image_root, out.parent.resolve())
    # The canonical copy of the log lives beside the output (same disk) while the SQL runs.
    with tempfile.TemporaryDirectory(prefix=f".{out.stem}.log-", dir=out.parent) as tmp:
        log = normalise_log(root, parts, Path(tmp), need_followers)
        sql = make_engine(engine, spark_master)
        try:
            card = _run(sql, cfg, log)
            if card["pairs_after_caps"] == 0:
                raise ValueError(f"{root}: 0 pairs, nothing written: {zero_pairs_reason(card)}")
            _write_pairs(sql, prefix, out, Path(tmp))
        finally:
            sql.close()
    card.update(image_root=str(image_root), events_dir=str(root), out=str(out), engine=engine)
    card["seconds"] = round(time.perf_counter() - start, 3)
    write_json_atomic(out.with_name(out.stem + ".card.json"), card)
    write_text_atomic(out.with_name(out.stem + ".card.md"), card_markdown(card))
    return CurationResult(out, card)


def _write_pairs(sql: Any, prefix: str, out: Path, tmp: Path) -> None:
    """The final pairs (stage 5's table with paths made relative to ``out``'s folder and
    the pair schema's types) written to ``out``: a file renamed into place, or a folder
    replacing whatever was there."""
    from rewardkit.io import replace_dir

    lit = "'" + prefix.replace("'", "''") + "/'"
    cols = []
    for name, kind in _PAIR_SQL_TYPES.items():
        expr = name
        if name in ("pos_path", "neg_path"):
            expr = f"CASE WHEN {name} LIKE '/%' THEN {name} ELSE CONCAT({lit}, {name}) END"
        cols.append(f"CAST({expr} AS {kind}) AS {name}")
    query = (f"SELECT {', '.join(cols)} FROM pairs "
             "ORDER BY prompt_id, pos_image_id, neg_image_id")  # fmt: skip
    if sql.name == "duckdb":
        if out.is_dir():
            shutil.rmtree(out)
        sql.write_parquet(query, out)
        return
    staged = tmp / "pairs.spark"
    sql.write_parquet(query, staged)
    for junk in staged.rglob("*"):  # Spark's _SUCCESS and .crc files: not data
        if junk.is_file() and (junk.name.startswith(".") or junk.name == "_SUCCESS"):
            junk.unlink()
    if out.is_file():
        out.unlink()
    moved = out.with_name(f".{out.name}.spark-{os.getpid()}")
    shutil.move(str(staged), moved)
    replace_dir(moved, out)


def _run(sql: Any, cfg: CurationConfig, log: NormalisedLog) -> dict:
    for name in ("events", "images", "users"):
        sql.register(name, getattr(log, name))
    b, c, s = cfg.bots, cfg.creator_signal, cfg.splits
    stage = sql.stage
    stage("user_behaviour", _sql("curation_1_user_behaviour", **dataclasses.asdict(b)))
    stage("bots", "SELECT user_id FROM user_behaviour WHERE flagged")
    stage("image_user", _sql("curation_2_clean_events", exclude_self=cfg.exclude_self_remix))
    stage("top_creators", "SELECT user_id FROM users WHERE 1 = 0" if not c.enabled else (
        "SELECT user_id FROM users WHERE follower_count > 0 AND follower_count >= (SELECT "
        f"PERCENTILE_DISC({c.top_quantile}) WITHIN GROUP (ORDER BY follower_count) FROM users "
        "WHERE follower_count > 0)"
    ))  # fmt: skip
    stage("image_scores", _sql(
        "curation_3_image_scores", distinct_users=cfg.distinct_users, signal=cfg.signal,
        prior_views=float(cfg.prior_views), min_remixes_for_positive=cfg.min_remixes_for_positive,
        min_views_for_positive=cfg.min_views_for_positive,
        min_views_for_negative=cfg.min_views_for_negative,
        max_remixes_for_negative=_or_big(cfg.max_remixes_for_negative),
    ))  # fmt: skip
    window = _or_big(None if cfg.time_window_days is None else cfg.time_window_days * 86_400.0)
    stage("candidates", _sql(
        "curation_4_candidates", max_candidates=cfg.max_candidates_per_prompt,
        margin=float(cfg.margin), window_seconds=window, seed=s.seed,
    ))  # fmt: skip
    stage("pairs", _sql(
        "curation_5_pairs", max_pairs_per_prompt=_or_big(cfg.max_pairs_per_prompt), seed=s.seed,
        creator_bonus=float(c.weight_bonus) if c.enabled else 0.0, train_frac=s.train,
        val_frac=s.val,
    ))  # fmt: skip
    return _card(sql, cfg, log)


def _or_big(v: float | int | None) -> float | int:
    return _BIG if v is None else v


_PAIR_SQL_TYPES = {
    "prompt": "VARCHAR", "pos_path": "VARCHAR", "neg_path": "VARCHAR", "prompt_id": "BIGINT",
    "pos_image_id": "BIGINT", "neg_image_id": "BIGINT", "pos_score": "DOUBLE",
    "neg_score": "DOUBLE", "weight": "DOUBLE", "split": "VARCHAR",
}  # fmt: skip


def _card(sql: Any, cfg: CurationConfig, log: NormalisedLog) -> dict[str, Any]:
    row = sql.table(_sql("curation_6_card", min_remixes=cfg.bots.min_remixes)).to_pylist()[0]
    counts = {k: int(v or 0) for k, v in row.items()}
    per_split = sql.table(
        "SELECT split, COUNT(*) AS pairs, COUNT(DISTINCT prompt_id) AS prompts "
        "FROM pairs GROUP BY split"
    ).to_pylist()
    counts.update(log.counts, pairs_after_caps=sum(int(r["pairs"]) for r in per_split))
    card: dict[str, Any] = {key: counts[key] for key in _LABELS}
    found = {r["split"]: r for r in per_split}
    card["pairs_per_split"] = {k: int(found.get(k, {}).get("pairs", 0)) for k in SPLITS}
    card["prompts_per_split"] = {k: int(found.get(k, {}).get("prompts", 0)) for k in SPLITS}
    card["events_per_type"] = log.events_per_type
    card["unknown_event_types"] = log.unknown_event_types
    card["input_formats"] = log.formats
    card["notes"] = _notes(card)
    card["warnings"] = _split_warnings(card, cfg.splits)
    card["config"] = cfg.to_dict()
    return card


# How the canonical log's columns read; any other form earns a note.
_CANONICAL_FORMATS = {"int64", "timestamp[us, UTC]", "text"}


def _notes(card: dict[str, Any]) -> list[str]:
    """One line per rule that changed the log, and per column read from another form."""
    said = {
        "events_no_user": "events without a user dropped",
        "events_no_time": "events without a time dropped",
        "events_unknown_type": "events of unknown types dropped",
        "events_unknown_image": "events on images missing from images.parquet dropped",
        "images_duplicate_rows": "images.parquet rows repeating an image_id dropped (the "
        "first row of each image is kept)",
        "users_no_id": "users.parquet rows without a user_id dropped",
        "users_duplicate_rows": "users.parquet rows repeating a user_id dropped",
    }
    notes = [f"{card[k]:,} {text}" for k, text in said.items() if card[k]]
    if card["events_unknown_type"]:
        notes[[k for k in said if card[k]].index("events_unknown_type")] += ": " + _types(
            card["unknown_event_types"]
        )
    notes += [f"{column} read as {how}" for column, how in card["input_formats"].items()
              if how not in _CANONICAL_FORMATS]  # fmt: skip
    return notes


def _types(counts: dict[str, int], most: int = 5) -> str:
    shown = [f"{name!r} ({n:,})" for name, n in list(counts.items())[:most]]
    return ", ".join(shown) + (f" and {len(counts) - most} more" if len(counts) > most else "")


def _split_warnings(card: dict[str, Any], splits: Splits) -> list[str]:
    """A warning per split that was meant to get prompts but got no pair."""
    fractions = {"train": splits.train, "val": splits.val, "test": splits.test}
    with_pairs = sum(card["prompts_per_split"].values())
    if with_pairs == 0:
        return []  # zero pairs fail with their own message
    return [
        f"split '{k}' is empty: {with_pairs} prompt(s) have pairs ({card['prompts']} in "
        f"images.parquet) and a hash of prompt_id puts each in one split, so with few prompts "
        f"a {splits.train:g}/{splits.val:g}/{splits.test:g} split can leave '{k}' without any"
        for k in SPLITS
        if fractions[k] > 0 and card["pairs_per_split"][k] == 0
    ]


def zero_pairs_reason(card: dict[str, Any]) -> str:
    """The stage that removed the last rows, from a card's counts (for a 0-pair curation)."""
    c, cfg = card, card["config"]
    dropped = (f"{c['events_no_user']:,} without a user, {c['events_no_time']:,} without a "
               f"time, {c['events_unknown_type']:,} of unknown types")  # fmt: skip
    if c["images_read"] == 0:
        return "images.parquet has no rows"
    if c["events_read"] == 0:
        return "events/*.parquet hold no events"
    if c["events_valid"] == 0:
        found = _types(c["unknown_event_types"]) or "none"
        return (f"the log's schema rules dropped every event ({dropped}; unknown types: "
                f"{found}; known: {', '.join(EVENT_TYPE_SYNONYMS)})")  # fmt: skip
    if c["events_valid"] == c["events_unknown_image"]:
        return f"all {c['events_valid']:,} events are on images missing from images.parquet"
    if c["events_per_type"].get("view", 0) + c["events_per_type"].get("remix", 0) == 0:
        return (f"no 'view' or 'remix' events to score images by (kept: "
                f"{_types(c['events_per_type'])}; dropped: {dropped})")  # fmt: skip
    if c["events_after_bot_filter"] == 0:
        return f"the bot filter dropped every event ({c['users_flagged_bots']:,} accounts flagged)"
    if c["events_after_self_remix_filter"] == 0:
        return "the self-remix filter (exclude_self_remix) dropped every remaining event"
    if c["images_eligible_positive"] == 0:
        return (f"no image is eligible as a positive (min_remixes_for_positive="
                f"{cfg['min_remixes_for_positive']}, min_views_for_positive="
                f"{cfg['min_views_for_positive']}; {c['images_scored']:,} images have kept "
                "events)")  # fmt: skip
    if c["images_eligible_negative"] == 0:
        return (f"no image is eligible as a negative (min_views_for_negative="
                f"{cfg['min_views_for_negative']}, max_remixes_for_negative="
                f"{cfg['max_remixes_for_negative']}; {c['images_scored']:,} images have kept "
                "events)")  # fmt: skip
    if c["candidate_pairs"] == 0:
        return (f"no candidate pairs: no prompt has an eligible positive and negative scoring "
                f"at least margin={cfg['margin']} apart and posted within time_window_days="
                f"{cfg['time_window_days']} ({c['images_eligible_positive']:,} eligible "
                f"positives, {c['images_eligible_negative']:,} negatives)")  # fmt: skip
    return "the caps (max_pairs_per_prompt) left none"


_LABELS = {
    "events_read": "events read",
    "events_no_user": "events without a user (dropped)",
    "events_no_time": "events without a time (dropped)",
    "events_unknown_type": "events of unknown types (dropped)",
    "events_valid": "events kept by the log's schema rules",
    "events_unknown_image": "events on unknown images (dropped)",
    "events_after_bot_filter": "events after bot filter",
    "events_after_self_remix_filter": "events after self-remix filter",
    "users_read": "account rows read",
    "users_no_id": "account rows without a user_id (dropped)",
    "users_duplicate_rows": "account rows repeating a user_id (dropped)",
    "users_checked_for_bots": "accounts checked for bot behaviour",
    "users_flagged_bots": "accounts flagged as bots",
    "top_creators": "top creators (creator signal)",
    "images_read": "image rows read",
    "images_duplicate_rows": "image rows repeating an image_id (dropped, first kept)",
    "images": "images",
    "prompts": "prompts",
    "images_scored": "images with kept events",
    "images_eligible_positive": "images eligible as positive",
    "images_eligible_negative": "images eligible as negative",
    "candidate_pairs": "candidate pairs",
    "pairs_after_caps": "pairs after caps",
}


def card_rows(card: dict[str, Any]) -> list[tuple[str, int]]:
    """(stage, count) rows of a dataset card, in pipeline order, then per split."""
    rows = [(label, card[key]) for key, label in _LABELS.items()]
    rows += [(f"pairs in {k}", v) for k, v in card["pairs_per_split"].items()]
    rows += [(f"prompts in {k}", v) for k, v in card["prompts_per_split"].items()]
    return rows


def card_markdown(card: dict[str, Any]) -> str:
    """The ``.card.md`` text: what was kept at every stage, and the config."""
    rows = card_rows(card)
    lines = ["# Preference pairs: dataset card", "",
             f"Curated from `{card['events_dir']}`; image paths are relative to the pairs "
             f"file's folder (images live under `{card['image_root']}`).", "",
             "| stage | count |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:,} |" for k, v in rows]
    for title, key in (("Warnings", "warnings"), ("Notes", "notes")):
        if card.get(key):
            lines += ["", f"## {title}", "", *[f"- {line}" for line in card[key]]]
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(card["config"], sort_keys=False)]
    return "\n".join(lines).rstrip() + "\n```\n"


def pair_truth_accuracy(pairs: pa.Table, truth_images: pa.Table) -> float:
    """Share of pairs whose positive has the higher true appeal (evaluation only).

    Args:
        pairs: curated pairs with pos_image_id and neg_image_id.
        truth_images: a table with image_id and appeal (e.g. a simulation's truth/images).

    Returns:
        The share in [0, 1] (ties count one half); nan if there are no pairs.

    Raises:
        ValueError: if a column is missing or a paired image has no truth.
    """
    for name, t, cols in (("pairs", pairs, ("pos_image_id", "neg_image_id")),
                          ("truth_images", truth_images, ("image_id", "appeal"))):  # fmt: skip
        missing = [c for c in cols if c not in t.column_names]
        if missing:
            raise ValueError(f"{name}: missing column(s) {missing}")
    if pairs.num_rows == 0:
        return float("nan")
    ids = truth_images["image_id"].to_numpy().astype(np.int64)
    appeal = truth_images["appeal"].to_numpy().astype(np.float64)
    order = np.argsort(ids)
    vals = []
    for col in ("pos_image_id", "neg_image_id"):
        q = pairs[col].to_numpy().astype(np.int64)
        k = np.minimum(np.searchsorted(ids, q, sorter=order), len(ids) - 1)
        if not np.array_equal(ids[order[k]], q):
            raise ValueError(f"truth_images: no appeal for some {col} values")
        vals.append(appeal[order[k]])
    d = vals[0] - vals[1]
    return float(((d > 0).sum() + 0.5 * (d == 0).sum()) / len(d))
