import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.world.appearance import FEATURE_NAMES, appearance_features
from rewardkit.world.community import (
    EVENT_TYPES,
    CommunityConfig,
    _event_codes,
    _population,
    grouped_pairwise_agreement,
    pairwise_truth_agreement,
    simulate_community,
)
from rewardkit.world.community_io import SCHEMA, read_community, write_community

TS = pa.timestamp("us", tz="UTC")


def _scenes(n: int, seed: int, size: int = 64) -> np.ndarray:
    """Varied synthetic images: a colour gradient, a centred box, optional texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = rng.uniform(0, 255, (n, 1, 1, 3)) + rng.uniform(-80, 80, (n, 1, 1, 3)) * xx[..., None]
    img = np.broadcast_to(bg, (n, size, size, 3)).copy()
    for k in range(n):
        r = int(rng.uniform(0.1, 0.4) * size)
        c = size // 2 + int(rng.integers(-size // 4, size // 4))
        img[k, max(0, c - r) : c + r, max(0, c - r) : c + r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 1, (n, 1, 1, 1)).clip(0) * rng.normal(0, 25, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _pool(n_images: int, n_prompts: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompt_id = rng.integers(0, n_prompts, n_images)
    images = pa.table({
        "image_id": np.arange(n_images, dtype=np.int64) + 100,
        "prompt_id": prompt_id,
        "prompt": pa.array([f"prompt {p}" for p in prompt_id]),
        "path": pa.array([f"images/{i}.png" for i in range(n_images)]),
    })  # fmt: skip
    feats = np.tanh(rng.normal(0, 0.6, (n_images, len(FEATURE_NAMES)))).astype(np.float32)
    return images, feats


@pytest.fixture(scope="module")
def small():
    images, feats = _pool(400, 20)
    config = CommunityConfig(n_users=4000, seed=3)
    return images, feats, config, simulate_community(images, feats, config)


# --- appearance features ---------------------------------------------------------------


def test_features_shape_range_and_batch_invariance():
    imgs = _scenes(300, seed=1)
    f = appearance_features(imgs)
    assert f.shape == (300, len(FEATURE_NAMES)) and f.dtype == np.float32
    assert np.all(np.abs(f) < 1) and f.std(axis=0).min() > 0.05
    mixed = np.concatenate([_scenes(290, seed=2), imgs[::7]])  # other companions and chunking
    np.testing.assert_allclose(appearance_features(mixed)[290:], f[::7], atol=1e-5)
    np.testing.assert_allclose(appearance_features(imgs[5:6]), f[5:6], atol=1e-5)


def test_features_resolution_and_meaning():
    imgs = _scenes(50, seed=3)
    f64 = appearance_features(imgs)
    f128 = appearance_features(imgs.repeat(2, axis=1).repeat(2, axis=2))
    np.testing.assert_allclose(f128, f64, atol=1e-4)
    assert np.abs(appearance_features(_scenes(50, seed=3, size=128)) - f64).mean() < 0.1
    flat = np.full((1, 64, 64, 3), 128, np.uint8)
    warm, cool, noisy = flat.copy(), flat.copy(), flat.copy()
    warm[..., 0], cool[..., 2] = 230, 230
    noisy[:] = np.random.default_rng(0).integers(0, 256, noisy.shape)
    centred = flat.copy()
    centred[0, 24:40, 24:40] = (250, 40, 40)
    w, c, n, fl, ce = (appearance_features(x)[0] for x in (warm, cool, noisy, flat, centred))
    idx = {name: k for k, name in enumerate(FEATURE_NAMES)}
    assert w[idx["warmth"]] > 0.5 > -0.5 > c[idx["warmth"]]
    assert n[idx["clutter"]] > 0.5 > -0.5 > fl[idx["clutter"]]
    assert ce[idx["centre_focus"]] > 0.5 and fl[idx["palette_harmony"]] > 0.5
    with pytest.raises(ValueError, match="uint8"):
        appearance_features(np.zeros((2, 8, 8, 3), np.float32))


# --- config --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("n_users", 10), ("n_users", 1.5), ("bot_fraction", 0.9), ("days", -1.0),
     ("creator_fraction", float("nan")), ("events_target", -5), ("seed", True),
     ("follower_view_share", 2.0), ("appeal_sample_users", 0), ("taste_mean", (1.0, float("inf")))],
)  # fmt: skip
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"CommunityConfig.{field}"):
        CommunityConfig(**{field: value})


def test_input_validation():
    images, feats = _pool(50, 5)
    with pytest.raises(ValueError, match="features"):
        simulate_community(images, feats[:-1], CommunityConfig(n_users=500))
    with pytest.raises(ValueError, match="taste_mean"):
        simulate_community(images, feats[:, :5], CommunityConfig(n_users=500))
    with pytest.raises(ValueError, match="path"):
        simulate_community(images.drop_columns(["path"]), feats, CommunityConfig(n_users=500))


# --- simulation ----------------------------------------------------------------------


def test_deterministic(small):
    images, feats, config, logs = small
    again = simulate_community(images, feats, config)
    for name in ("users", "images", "events", "truth_images", "truth_users"):
        assert getattr(logs, name).equals(getattr(again, name)), name
    other = simulate_community(images, feats, CommunityConfig(n_users=4000, seed=4))
    assert not other.events.equals(logs.events)


def test_schema_and_no_bot_flag_outside_truth(small):
    images, _, config, logs = small
    ev = logs.events
    assert ev.schema.names == [c for c, *_ in SCHEMA["events"]]
    assert ev.schema.field("ts").type == TS and ev.schema.field("user_id").type == pa.int64()
    assert ev.schema.field("event_type").type == pa.dictionary(pa.int8(), pa.string())
    assert logs.images.column_names == images.column_names + ["creator_id", "posted_at"]
    assert logs.users.column_names == ["user_id", "follower_count"]
    assert logs.truth_users.column_names[:3] == ["user_id", "is_bot", "is_creator"]
    assert [f"taste_{n}" for n in FEATURE_NAMES] == logs.truth_users.column_names[-8:]
    for table in (logs.users, logs.images, logs.events):
        assert not any("bot" in c for c in table.column_names)
    assert abs(ev.num_rows - config.n_events) < 0.15 * config.n_events
    assert set(_event_codes(ev["event_type"]).tolist()) == {0, 1, 2}
    assert np.all(np.diff(ev["ts"].to_numpy().astype(np.int64)) >= 0)
    appeal = logs.truth_images["appeal"].to_numpy()
    assert np.all((appeal > 0) & (appeal < 1)) and appeal.std() > 0.02
    rank = logs.truth_images["appeal_rank_in_prompt"].to_numpy()
    assert rank.min() == 1 and np.sum(rank == 1) == len(np.unique(images["prompt_id"]))


def _event_arrays(logs):
    ev = logs.events
    ids = logs.images["image_id"].to_numpy()
    row = np.searchsorted(ids, ev["image_id"].to_numpy())  # ids are sorted in _pool
    return ev["user_id"].to_numpy(), row, _event_codes(ev["event_type"]), ev["event_id"].to_numpy()


def test_reactions_follow_views_except_for_bots(small):
    _, _, _, logs = small
    user, row, kind, eid = _event_arrays(logs)
    key = user * len(logs.images) + row
    first_view = {}
    views = kind == 0
    order = np.argsort(eid[views])
    vk, ve = key[views][order], eid[views][order]
    uniq, first = np.unique(vk, return_index=True)
    first_view = dict(zip(uniq.tolist(), ve[first].tolist(), strict=True))
    bots = set(logs.truth_users.filter(logs.truth_users["is_bot"])["user_id"].to_pylist())
    assert bots
    orphans_by_bots = 0
    for k, e, u in zip(key[kind > 0].tolist(), eid[kind > 0].tolist(), user[kind > 0].tolist(),
                       strict=True):  # fmt: skip
        preceded = k in first_view and first_view[k] < e
        if u in bots:
            orphans_by_bots += not preceded
        else:
            assert preceded, f"user {u} reacted without a prior view"
    assert orphans_by_bots > 0  # bots remix without impressions
    posted = logs.images["posted_at"].to_numpy().astype(np.int64)
    assert np.all(logs.events["ts"].to_numpy().astype(np.int64) >= posted[row])


def test_biases_are_present_and_bots_detectable_from_behaviour(small):
    _, _, config, logs = small
    user, row, kind, _ = _event_arrays(logs)
    creator = logs.images["creator_id"].to_numpy()
    assert np.sum((kind == 2) & (user == creator[row])) > 20  # self-remixes
    is_bot = logs.truth_users["is_bot"].to_numpy()
    n_events = np.bincount(user, minlength=config.n_users)
    remixes = np.bincount(user[kind == 2], minlength=config.n_users)
    views = np.bincount(user[kind == 0], minlength=config.n_users)
    assert n_events[is_bot].mean() > 4 * n_events[~is_bot].mean()
    assert remixes[is_bot].sum() / views[is_bot].sum() > 1.0
    assert remixes[~is_bot].sum() / views[~is_bot].sum() < 0.3
    followers = logs.users["follower_count"].to_numpy()
    creators = followers[logs.truth_users["is_creator"].to_numpy()]
    assert followers.max() > 50 * max(np.median(creators), 1)  # heavy tail
    views_per_image = np.bincount(row[kind == 0], minlength=len(creator))
    assert np.percentile(views_per_image, 90) > 4 * np.percentile(views_per_image, 10)


def test_implicit_follower_sets_are_consistent():
    config = CommunityConfig(n_users=3001, creator_fraction=0.02)
    pop = _population(config, np.zeros(8, np.float32), np.random.default_rng(0))
    users = np.arange(config.n_users)
    for c in range(0, len(pop.creators), 7):
        members = pop.follower(np.full(pop.followers[c], c), np.arange(pop.followers[c]))
        assert len(np.unique(members)) == pop.followers[c]
        follows = pop.follows(users, np.full(config.n_users, c))
        assert follows.sum() == pop.followers[c] and follows[members].all()


def test_curated_signal_beats_naive_counts():
    images, feats = _pool(2000, 100, seed=1)
    logs = simulate_community(images, feats, CommunityConfig(n_users=20_000, seed=0))
    agreement = pairwise_truth_agreement(logs)
    assert agreement["pairs"] > 15_000
    assert agreement["curated"] > 0.72
    assert agreement["curated"] - agreement["naive"] > 0.10


def test_grouped_pairwise_agreement():
    truth = np.array([1.0, 2.0, 3.0, 1.0, 2.0, 5.0])
    groups = np.array([0, 0, 0, 1, 1, 2])
    assert grouped_pairwise_agreement(truth * 2, truth, groups) == (1.0, 4)
    assert grouped_pairwise_agreement(-truth, truth, groups) == (0.0, 4)
    assert grouped_pairwise_agreement(np.zeros(6), truth, groups) == (0.5, 4)


# --- files ---------------------------------------------------------------------------


def test_write_read_round_trip_and_errors(small, tmp_path):
    _, _, _, logs = small
    out = write_community(logs, tmp_path / "c", rows_per_part=10_000)
    parts = sorted(p.name for p in (out / "events").glob("*.parquet"))
    assert len(parts) == -(-logs.events.num_rows // 10_000) and parts[0] == "part-00000.parquet"
    again = write_community(logs, tmp_path / "d", rows_per_part=10_000)
    for f in sorted(out.rglob("*.parquet")):  # same tables, same bytes
        assert f.read_bytes() == (again / f.relative_to(out)).read_bytes(), f.name
    back = read_community(out)
    for name in ("users", "images", "events", "truth_images", "truth_users"):
        assert getattr(back, name).equals(getattr(logs, name)), name
    schema_md = (out / "schema.md").read_text()
    for table in (logs.users, logs.images, logs.events, logs.truth_images):
        assert all(f"| {c} |" in schema_md for c in table.column_names)
    write_community(logs, out, rows_per_part=10**9)  # fewer parts: stale ones are removed
    assert len(list((out / "events").glob("*.parquet"))) == 1
    assert read_community(out).events.equals(logs.events)

    pq.write_table(logs.users.drop_columns(["user_id"]), out / "users.parquet")
    with pytest.raises(ValueError, match=r"users.parquet.*user_id"):
        read_community(out)
    (out / "users.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="users.parquet"):
        read_community(out)
    assert EVENT_TYPES == ("view", "like", "remix")
