import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.data.curation import (
    SPLITS,
    BotRules,
    CurationConfig,
    curate,
    pair_truth_accuracy,
)
from rewardkit.io import write_parquet_atomic, write_text_atomic
from rewardkit.world.community_io import write_community
from tests.data.small_community import small_community

TS = pa.timestamp("us", tz="UTC")
T0 = 1_704_067_200  # 2024-01-01, seconds
DAY = 86_400
DATA = Path(__file__).resolve().parents[2] / "src" / "rewardkit" / "data"
# prompt 1: A (10) heavily exposed, 6 remixes of 100 views; B (11) 4 of 8 views; C (12) only
# self-remixed; G (13) barely seen; H (14) posted 30 days later. prompt 2: D (20), E (21).
POSTED = {10: 0, 11: 0, 12: 0, 13: 0, 14: 30 * DAY, 20: 0, 21: 0}
CREATOR = {10: 100, 11: 101, 12: 102, 13: 103, 14: 104, 20: 105, 21: 106}
BOT = 9000
BOT_EVENTS = 8  # 4 remixes and 4 likes, a minute after posting, no views


def _events() -> list[tuple[int, int, int, str]]:
    ev: list[tuple[int, int, int, str]] = []

    def organic(image: int, viewers: range, remixers: int) -> None:
        for k, u in enumerate(viewers):
            t = T0 + POSTED[image] + 3600 * (k + 1)
            ev.append((t, u, image, "view"))
            if k < remixers:
                ev.append((t + 600, u, image, "remix"))

    organic(10, range(1000, 1100), 6)
    organic(11, range(1100, 1108), 4)
    organic(12, range(1200, 1225), 0)
    for k in range(5):  # creator 102 remixes its own image C
        ev.append((T0 + 100 + 1000 * k, 102, 12, "remix" if k else "view"))
        ev.append((T0 + 150 + 1000 * k, 102, 12, "remix"))
    organic(13, range(1300, 1303), 0)
    organic(14, range(1400, 1450), 0)
    organic(20, range(2000, 2030), 1)
    organic(21, range(2100, 2130), 6)
    for image in (10, 12, 20, 21):  # the bot: remix and like, seconds after posting
        ev.append((T0 + POSTED[image] + 60, BOT, image, "remix"))
        ev.append((T0 + POSTED[image] + 62, BOT, image, "like"))
    for image in (10, 11, 20):  # a keen human: views, then remixes hours later
        ev.append((T0 + 5 * 3600, 9001, image, "view"))
        ev.append((T0 + 9 * 3600, 9001, image, "remix"))
    return sorted(ev)


def _write_logs(root: Path, drop: str | None = None, followers: dict | None = None) -> Path:
    ev = _events()
    ids = sorted(POSTED)
    images = pa.table({
        "image_id": pa.array(ids, pa.int64()),
        "prompt_id": pa.array([i // 10 for i in ids], pa.int64()),
        "prompt": [f"prompt {i // 10}" for i in ids],
        "path": [f"images/{i}.png" for i in ids],
        "creator_id": pa.array([CREATOR[i] for i in ids], pa.int64()),
        "posted_at": pa.array([(T0 + POSTED[i]) * 10**6 for i in ids], TS),
    })  # fmt: skip
    users = sorted({u for _, u, _, _ in ev} | set(CREATOR.values()))
    events_t = pa.table({
        "event_id": pa.array(range(len(ev)), pa.int64()),
        "ts": pa.array([t * 10**6 for t, _, _, _ in ev], TS),
        "user_id": pa.array([u for _, u, _, _ in ev], pa.int64()),
        "image_id": pa.array([i for _, _, i, _ in ev], pa.int64()),
        "event_type": [k for _, _, _, k in ev],
    })  # fmt: skip
    if drop:
        events_t = events_t.drop_columns([drop])
    write_parquet_atomic(root / "images.parquet", images)
    users_t = pa.table({"user_id": pa.array(users, pa.int64())})
    if followers is not None:
        counts = pa.array([followers.get(u, 0) for u in users], pa.int64())
        users_t = users_t.append_column("follower_count", counts)
    write_parquet_atomic(root / "users.parquet", users_t)
    write_parquet_atomic(root / "events" / "part-00000.parquet", events_t)
    return root


# The rules on the tiny log: no prior and no margin, so every rule is visible on its own.
RULES = CurationConfig(prior_views=0.0, margin=0.0, min_views_for_negative=20)


def _pairs(tmp_path: Path, config: CurationConfig = RULES) -> tuple[set, dict]:
    logs = tmp_path / "logs"
    if not logs.exists():
        _write_logs(logs)
    out = curate(logs, config, tmp_path / "out" / "pairs.parquet")
    pos, neg = out.pairs["pos_image_id"].to_pylist(), out.pairs["neg_image_id"].to_pylist()
    pairs = set(zip(pos, neg, strict=True))
    return pairs, out.card


def test_bot_flagged_and_dropped_keen_human_kept(tmp_path):
    _, card = _pairs(tmp_path)
    assert card["users_flagged_bots"] == 1  # the bot, not the keen human (9001)
    assert card["events_after_bot_filter"] == card["events_read"] - BOT_EVENTS
    _, off = _pairs(tmp_path, dataclasses.replace(RULES, bots=BotRules(enabled=False)))
    assert off["users_flagged_bots"] == 0 and off["events_after_bot_filter"] == off["events_read"]


def test_exposure_normalisation_flips_naive_counts(tmp_path):
    pairs, _ = _pairs(tmp_path)
    assert (11, 10) in pairs and (10, 11) not in pairs  # 4/8 views beats 6/100 views
    naive = CurationConfig.from_yaml(DATA / "curation_naive.yaml")
    naive_pairs, _ = _pairs(tmp_path, naive)
    assert (10, 11) in naive_pairs and (11, 10) not in naive_pairs  # 7 remix events beat 4


def test_self_remix_excluded(tmp_path):
    pairs, card = _pairs(tmp_path)
    assert (12, 10) not in pairs and (10, 12) in pairs  # C's own remixes do not count
    assert card["events_after_self_remix_filter"] == card["events_after_bot_filter"] - 10
    # One vote per user already tames a self-remixer; counting every remix event does not.
    votes, _ = _pairs(tmp_path, dataclasses.replace(RULES, exclude_self_remix=False))
    assert (12, 10) not in votes
    every = dataclasses.replace(RULES, exclude_self_remix=False, distinct_users=False)
    kept, _ = _pairs(tmp_path, every)
    assert (12, 10) in kept  # 9 self-remixes of 26 views beat 7 of 101


def test_min_exposure_for_negatives(tmp_path):
    pairs, _ = _pairs(tmp_path)
    assert not any(neg == 13 for _, neg in pairs)  # 3 views: never had the chance
    loose, _ = _pairs(tmp_path, dataclasses.replace(RULES, min_views_for_negative=0))
    assert (11, 13) in loose


def test_time_window(tmp_path):
    pairs, _ = _pairs(tmp_path)
    assert not any(14 in p for p in pairs)  # posted 30 days after the others
    anytime, _ = _pairs(tmp_path, dataclasses.replace(RULES, time_window_days=None))
    assert (11, 14) in anytime and (10, 14) in anytime


def test_cap_per_prompt_and_output_format(tmp_path):
    capped = dataclasses.replace(RULES, max_pairs_per_prompt=1)
    out = curate(_write_logs(tmp_path / "logs"), capped, tmp_path / "out" / "pairs.parquet")
    assert sorted(out.pairs["prompt_id"].to_pylist()) == [1, 2]
    assert out.card["candidate_pairs"] > out.card["pairs_after_caps"] == 2
    assert out.pairs.column_names[:3] == ["prompt", "pos_path", "neg_path"]
    row = out.pairs.to_pylist()[0]
    assert row["prompt"] == "prompt 1" and row["split"] in ("train", "val", "test")
    resolved = os.path.normpath(tmp_path / "out" / row["pos_path"])
    assert resolved == str(tmp_path / "logs" / "images" / f"{row['pos_image_id']}.png")
    card = json.loads((tmp_path / "out" / "pairs.card.json").read_text())
    assert card["image_root"] == str((tmp_path / "logs").resolve())
    assert "| pairs after caps | 2 |" in (tmp_path / "out" / "pairs.card.md").read_text()
    assert pq.read_table(tmp_path / "out" / "pairs.parquet").equals(out.pairs)


def test_bad_input_names_file_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        curate(tmp_path / "nowhere", RULES, tmp_path / "p.parquet")
    _write_logs(tmp_path / "logs", drop="event_type")
    with pytest.raises(ValueError, match=r"part-00000\.parquet.*event_type"):
        curate(tmp_path / "logs", RULES, tmp_path / "p.parquet")
    _write_logs(tmp_path / "logs")
    (tmp_path / "logs" / "users.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="users.parquet"):
        curate(tmp_path / "logs", RULES, tmp_path / "p.parquet")
    _write_logs(tmp_path / "logs")
    creator = dataclasses.replace(RULES, creator_signal=dataclasses.replace(
        RULES.creator_signal, enabled=True))  # fmt: skip
    with pytest.raises(ValueError, match="users.parquet.*follower_count"):
        curate(tmp_path / "logs", creator, tmp_path / "p.parquet")


def test_creator_signal_weights_positives_remixed_by_top_creators(tmp_path):
    followers = {**{c: k + 1 for k, c in enumerate(CREATOR.values())}, 1000: 500}
    _write_logs(tmp_path / "logs", followers=followers)  # 1000 remixed A: the top creator
    signal = dataclasses.replace(RULES.creator_signal, enabled=True, weight_bonus=0.5)
    out = curate(tmp_path / "logs", dataclasses.replace(RULES, creator_signal=signal),
                 tmp_path / "pairs.parquet")  # fmt: skip
    assert out.card["top_creators"] == 1
    weights = dict(zip(out.pairs["pos_image_id"].to_pylist(), out.pairs["weight"].to_pylist(),
                       strict=True))  # fmt: skip
    assert weights[10] == 1.5 and weights[11] == 1.0 and weights[21] == 1.0


@pytest.mark.parametrize(
    "text, key",
    [
        ("margni: 0.1\n", "margni"),
        ("bots:\n  max_events_per_hr: 5\n", "bots.max_events_per_hr"),
        ("margin: -1\n", "margin"),
        ("signal: likes\n", "signal"),
        ("bots:\n  enabled: 1\n", "bots.enabled"),
        ("splits:\n  train: 0.9\n", "splits"),
        ("max_pairs_per_prompt: 2.5\n", "max_pairs_per_prompt"),
        ("creator_signal: yes\n", "creator_signal"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    write_text_atomic(path, text)
    with pytest.raises(ValueError, match=rf"bad\.yaml: {key}"):
        CurationConfig.from_yaml(path)


def test_shipped_configs():
    assert CurationConfig.from_yaml(DATA / "curation_default.yaml") == CurationConfig()
    naive = CurationConfig.from_yaml(DATA / "curation_naive.yaml")
    assert naive.signal == "remix_count" and not naive.bots.enabled
    assert not naive.exclude_self_remix and naive.time_window_days is None


# --- a simulated community ---------------------------------------------------------------


@pytest.fixture(scope="module")
def community(tmp_path_factory):
    logs = small_community(prompts=50, per_prompt=10, users=4000, first_id=100)
    return write_community(logs, tmp_path_factory.mktemp("community")), logs


def test_curated_pairs_beat_naive_pairs_on_truth(community, tmp_path):
    root, logs = community
    curated = curate(root, CurationConfig(), tmp_path / "curated.parquet")
    naive_cfg = CurationConfig.from_yaml(DATA / "curation_naive.yaml")
    naive = curate(root, naive_cfg, tmp_path / "naive.parquet")
    acc_c = pair_truth_accuracy(curated.pairs, logs.truth_images)
    acc_n = pair_truth_accuracy(naive.pairs, logs.truth_images)
    print(f"truth accuracy: curated {acc_c:.3f} ({curated.pairs.num_rows} pairs), "
          f"naive {acc_n:.3f} ({naive.pairs.num_rows} pairs)")  # fmt: skip
    assert curated.pairs.num_rows >= 300
    assert acc_c > 0.85 and acc_c - acc_n > 0.12
    n_bots = int(np.sum(logs.truth_users["is_bot"].to_numpy()))
    assert abs(curated.card["users_flagged_bots"] - n_bots) <= 0.1 * n_bots


def test_splits_disjoint_by_prompt_and_deterministic(community, tmp_path):
    root, _ = community
    a = curate(root, CurationConfig(), tmp_path / "a" / "pairs.parquet")
    b = curate(root, CurationConfig(), tmp_path / "b" / "pairs.parquet")
    assert a.pairs.equals(b.pairs)
    assert (tmp_path / "a/pairs.parquet").read_bytes() == (
        tmp_path / "b/pairs.parquet"
    ).read_bytes()
    split, prompt = a.pairs["split"].to_pylist(), a.pairs["prompt_id"].to_pylist()
    prompts = {s: {p for p, x in zip(prompt, split, strict=True) if x == s} for s in SPLITS}
    assert all(prompts.values())
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                or prompts["val"] & prompts["test"])  # fmt: skip
    assert a.card["prompts_per_split"] == {k: len(v) for k, v in prompts.items()}
    other = dataclasses.replace(CurationConfig(), splits=dataclasses.replace(
        CurationConfig().splits, seed=7))  # fmt: skip
    c = curate(root, other, tmp_path / "c" / "pairs.parquet")
    assert c.pairs["split"].to_pylist() != a.pairs["split"].to_pylist()
    assert np.all(a.pairs["weight"].to_numpy() == 1.0)
    assert np.all(a.pairs["pos_score"].to_numpy() - a.pairs["neg_score"].to_numpy() >= 0.03)
