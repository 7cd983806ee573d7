"""AdWorld's simulated creative community: implicit feedback logs with the biases of real ones.

The model (all vectorised numpy; 10^6 users and 10^7 events in seconds):

- Users. Each user ``u`` has a taste ``w_u = mu + heterogeneity * z_u`` (``z_u ~ N(0, I)``)
  over the appearance features of ``appearance.py`` (``mu = taste_mean``: the community, on
  average, likes warm, saturated, bright, colourful, centred, harmonious, uncluttered images)
  and a log-normal activity level (how often the explore feed shows them things).
- Creators (``creator_fraction`` of users) have Lomax (Zipf-like) follower counts:
  ``floor(follower_scale * (U ** (-1 / follower_exponent) - 1))``, capped at n_users / 5.
  Follower sets are implicit but consistent: follower ``k`` of creator ``c`` is user
  ``P[(a_c k + b_c) mod n]`` for a global random permutation ``P`` and a per-creator affine
  bijection, so "does u follow c" is an O(1) inverse map (``k < followers_c``). Images are
  assigned to creators with weight ``(1 + followers) ** 0.5`` and posted uniformly in time.
- Feed (the exposure bias). Image ``i`` gets ``Poisson`` views with mean proportional to
  ``(1 + followers) ** exposure_exponent * (1 - exp(-age / recency_days))``, ``age`` the time
  it was visible before the window closed; view times follow the same recency decay.
  A share ``follower_view_share * F / (F + 20)`` of its viewers are the creator's followers;
  the rest come from the explore feed, in proportion to activity.
- Reactions. Per view, ``P(remix) = sigmoid(remix_bias + w_u . f_i + loyalty * follows)`` and
  ``P(like) = sigmoid(like_bias + w_u . f_i + loyalty * follows)``; likes come seconds after
  the view, remixes minutes after it.
- Self-remixes. A ``self_remixer_fraction`` of creators view and remix each of their own
  images ``Poisson(self_remix_mean)`` times, whatever the image is like.
- Bots (``bot_fraction`` of accounts, never creators, never in the explore feed) each promote
  up to 3 creators from a small pool (``promoted_creator_fraction`` of posting creators). They
  hit each promoted image in campaigns (``Poisson``, sized so a bot makes about
  ``bot_events_per_bot`` events): minutes after posting, a remix, half the time a view and
  often a like, all within seconds. Bots are visible only through behaviour: high event rate,
  remixes per view near or above 1, remixes without views, bursts right after posting, a
  handful of targeted creators. ``is_bot`` is only in the truth tables.

Ground truth: ``appeal(i)`` = mean of ``sigmoid(remix_bias + w_u . f_i)`` over a sample of
``appeal_sample_users`` non-bot users: the expected remix rate per view under uniform exposure,
without social bias. ``schema.md`` (written by ``write_community``) documents every column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rewardkit.world.appearance import FEATURE_NAMES

EVENT_TYPES: tuple[str, ...] = ("view", "like", "remix")
EPOCH_US = 1_704_067_200_000_000  # the window opens 2024-01-01T00:00:00Z
TS_TYPE = pa.timestamp("us", tz="UTC")
# Default community taste over FEATURE_NAMES (warmth, saturation, brightness, contrast,
# colourfulness, clutter, centre_focus, palette_harmony).
DEFAULT_TASTE_MEAN: tuple[float, ...] = (0.75, 0.9, 0.6, 0.45, 0.9, -1.35, 1.35, 0.9)
_DAY = 86_400.0
_FOLLOWER_SHARE_HALF = 20.0  # a creator with 20 followers gets half the max follower share
_BOT_EVENTS_PER_CAMPAIGN = 2.1  # 1 remix + 0.5 view + 0.6 like


# Valid range of each CommunityConfig field (inclusive); an int bound means an int field.
# fmt: off
_BOUNDS: dict[str, tuple[float, float]] = {
    "n_users": (100, 100_000_000), "events_target": (0, 10**12), "seed": (0, 2**63 - 1),
    "days": (0.01, 3650.0), "creator_fraction": (1e-6, 1.0), "follower_exponent": (0.1, 10.0),
    "follower_scale": (0.0, 1e6), "exposure_exponent": (0.0, 3.0), "recency_days": (1e-3, 1e4),
    "follower_view_share": (0.0, 1.0), "loyalty": (-10.0, 10.0), "remix_bias": (-20.0, 20.0),
    "like_bias": (-20.0, 20.0), "taste_heterogeneity": (0.0, 100.0),
    "self_remixer_fraction": (0.0, 1.0), "self_remix_mean": (0.0, 1e4), "bot_fraction": (0.0, 0.5),
    "bot_events_per_bot": (0.0, 1e6), "promoted_creator_fraction": (0.0, 1.0),
    "appeal_sample_users": (1, 10_000_000),
}
# fmt: on


@dataclass
class CommunityConfig:
    """Knobs of the simulated community; every default carries its reason."""

    n_users: int = 10_000  # big enough for heavy tails, fast enough for tests and demos
    events_target: int | None = None  # None: 10 per user, sparse like real implicit logs
    seed: int = 0
    days: float = 30.0  # a month of logs: long enough for exposure-time differences
    creator_fraction: float = 0.05  # most accounts consume; a few post (Picsart-like)
    follower_exponent: float = 1.0  # Zipf tail: 10^4-10^5 followers at 10^6 users
    follower_scale: float = 5.0  # median creator has ~5 followers
    exposure_exponent: float = 0.6  # a 10^4-follower creator gets ~250x the views of a new one
    recency_days: float = 3.0  # feeds favour the new: most views within days of posting
    follower_view_share: float = 0.6  # big creators get most views from their followers
    loyalty: float = 0.8  # followers remix/like more (logit boost): the follower-base bias
    remix_bias: float = -2.5  # ~12% remixes per view (median image): creators came to create
    like_bias: float = -1.5  # ~25% likes per view: likes are cheap, more frequent than remixes
    taste_mean: tuple[float, ...] | None = None  # None: DEFAULT_TASTE_MEAN (needs 8 features)
    taste_heterogeneity: float = 1.0  # users disagree about as much as they agree
    self_remixer_fraction: float = 0.2  # a minority of creators boost their own posts
    self_remix_mean: float = 3.0  # ... several times per post, comparable to organic remixes
    bot_fraction: float = 0.015  # 1-2% of accounts are bots
    bot_events_per_bot: float = 60.0  # ~6x a normal user's activity
    promoted_creator_fraction: float = 0.02  # bots push a small set of creators
    appeal_sample_users: int = 20_000  # Monte Carlo error of appeal < 0.1 point

    def __post_init__(self) -> None:
        for name, (lo, hi) in _BOUNDS.items():
            v = getattr(self, name)
            if v is None and name == "events_target":
                continue
            is_int = isinstance(lo, int)
            ok_type = isinstance(v, int) if is_int else isinstance(v, int | float)
            if isinstance(v, bool) or not ok_type or not lo <= v <= hi:  # NaN fails lo <= v
                kind = "an integer" if is_int else "a number"
                raise ValueError(
                    f"CommunityConfig.{name}: expected {kind} in [{lo}, {hi}], got {v!r}"
                )
        if self.creator_fraction + self.bot_fraction > 1.0:
            raise ValueError("CommunityConfig.bot_fraction: creator_fraction + bot_fraction > 1")
        if self.taste_mean is not None:
            if len(self.taste_mean) == 0 or not all(math.isfinite(x) for x in self.taste_mean):
                raise ValueError(
                    f"CommunityConfig.taste_mean: expected finite numbers, got {self.taste_mean!r}"
                )
            self.taste_mean = tuple(float(x) for x in self.taste_mean)

    @property
    def n_events(self) -> int:
        """The approximate number of events to simulate."""
        return 10 * self.n_users if self.events_target is None else self.events_target


@dataclass
class CommunityLogs:
    """The simulated (or your own) logs. ``truth_*`` are None for real logs."""

    users: pa.Table
    images: pa.Table
    events: pa.Table
    truth_images: pa.Table | None = None
    truth_users: pa.Table | None = None


@dataclass
class _Population:
    taste: np.ndarray  # (n, F) float32
    activity: np.ndarray  # (n,) explore-feed activity
    is_bot: np.ndarray  # (n,) bool
    tickets: np.ndarray  # explore-feed draws: user ids repeated by activity (bots excluded)
    creators: np.ndarray  # (C,) user ids, ascending
    followers: np.ndarray  # (C,) follower counts
    self_remixer: np.ndarray  # (C,) bool
    perm: np.ndarray  # (n,) global permutation behind the implicit follower sets
    inv_perm: np.ndarray
    mult: np.ndarray  # (C,) affine bijection k -> (mult k + shift) mod n, mult coprime to n
    mult_inv: np.ndarray
    shift: np.ndarray

    def follower(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        """User id of the k-th follower of creator index c (k < followers[c])."""
        return self.perm[(self.mult[c] * k + self.shift[c]) % len(self.perm)]

    def follows(self, u: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Whether user u follows creator index c (consistent with ``follower``)."""
        n = len(self.perm)
        return ((self.inv_perm[u] - self.shift[c]) % n * self.mult_inv[c]) % n < self.followers[c]


def _population(cfg: CommunityConfig, mu: np.ndarray, rng: np.random.Generator) -> _Population:
    n = cfg.n_users
    role = rng.random(n)
    is_creator = role < cfg.creator_fraction
    is_bot = (role >= cfg.creator_fraction) & (role < cfg.creator_fraction + cfg.bot_fraction)
    z = rng.standard_normal((n, len(mu)), dtype=np.float32)
    taste = (mu[None, :] + np.float32(cfg.taste_heterogeneity) * z).astype(np.float32)
    activity = rng.lognormal(0.0, 1.0, n)
    tickets = np.repeat(np.arange(n, dtype=np.int64), np.rint(2 * activity * ~is_bot).astype(int))
    if len(tickets) == 0:
        tickets = np.flatnonzero(~is_bot)
    creators = np.flatnonzero(is_creator)
    c = len(creators)
    lomax = np.floor(cfg.follower_scale * (rng.random(c) ** (-1 / cfg.follower_exponent) - 1))
    followers = np.minimum(lomax, n // 5).astype(np.int64)
    perm = rng.permutation(n)
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(n)
    mult = rng.integers(1, n, c)
    while (bad := np.flatnonzero(np.gcd(mult, n) != 1)).size:
        mult[bad] = rng.integers(1, n, bad.size)
    mult_inv = np.array([pow(int(m), -1, n) for m in mult], dtype=np.int64)
    return _Population(
        taste, activity, is_bot, tickets, creators, followers,
        rng.random(c) < cfg.self_remixer_fraction, perm, inv_perm, mult, mult_inv,
        rng.integers(0, n, c),
    )  # fmt: skip


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _taste_dot(pop: _Population, feats: np.ndarray, u: np.ndarray, i: np.ndarray) -> np.ndarray:
    """w_u . f_i for aligned arrays of users and images, in chunks to bound memory."""
    out = np.empty(len(u), dtype=np.float32)
    for s in range(0, len(u), 1 << 20):
        out[s : s + (1 << 20)] = np.einsum(
            "ij,ij->i", pop.taste[u[s : s + (1 << 20)]], feats[i[s : s + (1 << 20)]]
        )
    return out


_Part = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ts (s), user, image row, type


def _part(ts: np.ndarray, user: np.ndarray, img: np.ndarray, kind: int) -> _Part:
    return ts, user.astype(np.int64), img.astype(np.int64), np.full(len(ts), kind, np.int8)


def _viewers(pop: _Population, c: np.ndarray, cfg: CommunityConfig, rng) -> tuple:
    """Who sees a post of creator index c: (user ids, whether each follows the creator)."""
    f = pop.followers[c]
    from_followers = rng.random(len(c)) < cfg.follower_view_share * f / (f + _FOLLOWER_SHARE_HALF)
    user = pop.tickets[rng.integers(0, len(pop.tickets), len(c))]
    fi = np.flatnonzero(from_followers)
    user[fi] = pop.follower(c[fi], (rng.random(fi.size) * f[fi]).astype(np.int64))
    return user, from_followers | pop.follows(user, c)


def _organic(pop, feats, cj, posted, exposure, n_views, cfg, rng) -> list[_Part]:
    """Feed views (exposure-biased) and the likes/remixes they lead to."""
    tau, horizon = cfg.recency_days * _DAY, cfg.days * _DAY
    counts = rng.poisson(exposure * (n_views / exposure.sum()))
    img = np.repeat(np.arange(len(cj)), counts)
    user, follows = _viewers(pop, cj[img], cfg, rng)
    age = horizon - posted[img]
    ts = posted[img] - tau * np.log1p(rng.random(len(img)) * np.expm1(-age / tau))
    logit = _taste_dot(pop, feats, user, img) + np.float32(cfg.loyalty) * follows
    like = rng.random(len(img), dtype=np.float32) < _sigmoid(logit + np.float32(cfg.like_bias))
    remix = rng.random(len(img), dtype=np.float32) < _sigmoid(logit + np.float32(cfg.remix_bias))
    return [
        _part(ts, user, img, 0),
        _part(ts[like] + 1 + rng.exponential(30.0, like.sum()), user[like], img[like], 1),
        _part(ts[remix] + 5 + rng.exponential(600.0, remix.sum()), user[remix], img[remix], 2),
    ]


def _self_remixes(pop, cj, posted, cfg, rng) -> list[_Part]:
    """Self-promoting creators view, then remix, each of their own images several times."""
    m = rng.poisson(cfg.self_remix_mean, len(cj)) * pop.self_remixer[cj]
    img = np.flatnonzero(m > 0)
    view_ts = posted[img] + 1 + rng.exponential(120.0, img.size)
    rimg = np.repeat(img, m[img])
    rts = np.repeat(view_ts, m[img]) + 60 + rng.exponential(6 * 3600.0, rimg.size)
    creator = pop.creators[cj]
    return [_part(view_ts, creator[img], img, 0), _part(rts, creator[rimg], rimg, 2)]


def _bots(pop, cj, posted, cfg, rng) -> tuple[list[_Part], np.ndarray]:
    """Bot campaigns on promoted creators' images; returns events and promoted creator indices."""
    bots = np.flatnonzero(pop.is_bot)
    posting = np.unique(cj)
    n_prom = int(round(cfg.promoted_creator_fraction * len(posting)))
    if n_prom == 0 or bots.size == 0 or cfg.bot_events_per_bot == 0:
        return [], np.zeros(0, np.int64)
    promoted = np.sort(rng.choice(posting, n_prom, replace=False))
    slots = min(3, n_prom)
    n_c = len(pop.creators)
    picks = promoted[rng.integers(0, n_prom, (bots.size, slots))].ravel()
    pairs = np.unique(np.repeat(bots, slots) * n_c + picks)  # distinct (bot, creator)
    pair_bot, pair_c = pairs // n_c, pairs % n_c
    by_creator = np.argsort(cj, kind="stable")
    n_img = np.bincount(cj, minlength=n_c)
    first = np.cumsum(n_img) - n_img
    cnt = n_img[pair_c]
    rep = np.repeat(np.arange(pairs.size), cnt)
    within = np.arange(rep.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    img, user = by_creator[first[pair_c][rep] + within], pair_bot[rep]
    lam = bots.size * cfg.bot_events_per_bot / (img.size * _BOT_EVENTS_PER_CAMPAIGN)
    k = rng.poisson(lam, img.size)
    img, user = np.repeat(img, k), np.repeat(user, k)
    t0 = posted[img] + 5 + rng.exponential(120.0, img.size)  # minutes after posting
    view, like = rng.random(img.size) < 0.5, rng.random(img.size) < 0.6
    return [
        _part(t0[view], user[view], img[view], 0),
        _part(t0[like] + 1 + rng.exponential(3.0, like.sum()), user[like], img[like], 1),
        _part(t0 + 1 + rng.exponential(3.0, img.size), user, img, 2),
    ], promoted


def _appeal(pop: _Population, feats: np.ndarray, cfg: CommunityConfig, rng) -> np.ndarray:
    """Expected remix rate per view under uniform exposure, over sampled non-bot users."""
    nonbot = np.flatnonzero(~pop.is_bot)
    sample = np.sort(rng.choice(nonbot, min(cfg.appeal_sample_users, nonbot.size), replace=False))
    w = pop.taste[sample]  # (S, F)
    out = np.empty(len(feats), dtype=np.float64)
    step = max(1, (1 << 24) // len(sample))
    for s in range(0, len(feats), step):
        logits = w @ feats[s : s + step].T + np.float32(cfg.remix_bias)  # (S, step)
        out[s : s + step] = _sigmoid(logits).mean(axis=0, dtype=np.float64)
    return out


def _check_inputs(images: pa.Table, features: np.ndarray, cfg: CommunityConfig):
    if not isinstance(images, pa.Table):
        raise TypeError(f"images: expected a pyarrow Table, got {type(images).__name__}")
    missing = [
        c for c in ("image_id", "prompt_id", "prompt", "path") if c not in images.schema.names
    ]
    if missing:
        raise ValueError(f"images: missing column(s) {missing}")
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 2 or len(feats) != images.num_rows or len(feats) == 0:
        raise ValueError(
            f"features: expected ({images.num_rows}, F) rows aligned with images, "
            f"got shape {feats.shape}"
        )
    if not np.isfinite(feats).all():
        raise ValueError("features: contains NaN or inf")
    ids = images["image_id"].to_numpy().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise ValueError("images.image_id: values must be unique")
    mu = cfg.taste_mean if cfg.taste_mean is not None else DEFAULT_TASTE_MEAN
    if len(mu) != feats.shape[1]:
        raise ValueError(
            f"CommunityConfig.taste_mean: has {len(mu)} entries but features have "
            f"{feats.shape[1]} columns; set taste_mean to match"
        )
    return feats, np.asarray(mu, dtype=np.float32), ids


def simulate_community(
    images: pa.Table, features: np.ndarray, config: CommunityConfig
) -> CommunityLogs:
    """Simulate a community's users, posts and biased event logs over a pool of images.

    Args:
        images: one row per image, with at least image_id (int64), prompt_id (int64),
            prompt (string) and path (string); other columns are passed through.
        features: (N, F) appearance features in the row order of ``images``
            (``appearance.appearance_features``).
        config: the community's knobs.

    Returns:
        The logs (users, images, events) and the ground truth (truth_images, truth_users).
        Deterministic: the same inputs and seed give equal tables.

    Raises:
        ValueError: if the images table or features are malformed, or do not match the config.
    """
    cfg = config
    feats, mu, ids = _check_inputs(images, features, cfg)
    r_pop, r_post, r_view, r_self, r_bot, r_truth = (
        np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(6)
    )
    pop = _population(cfg, mu, r_pop)
    n_img, horizon = len(feats), cfg.days * _DAY
    weight = np.cumsum((1.0 + pop.followers) ** 0.5)  # prolific creators have more followers
    cj = np.minimum(np.searchsorted(weight, r_post.random(n_img) * weight[-1]), len(weight) - 1)
    posted = r_post.random(n_img) * horizon
    exposure = (1.0 + pop.followers[cj]) ** cfg.exposure_exponent * -np.expm1(
        -(horizon - posted) / (cfg.recency_days * _DAY)
    )
    side = _self_remixes(pop, cj, posted, cfg, r_self)
    bot_parts, promoted = _bots(pop, cj, posted, cfg, r_bot)
    side += bot_parts
    # Pilot: reactions per view, to size organic views so all events come near the target.
    cum = np.cumsum(exposure)
    pi = np.minimum(np.searchsorted(cum, r_view.random(20_000) * cum[-1]), n_img - 1)
    pu, pf = _viewers(pop, cj[pi], cfg, r_view)
    dot = _taste_dot(pop, feats, pu, pi) + cfg.loyalty * pf
    rate = float(np.mean(_sigmoid(dot + cfg.like_bias) + _sigmoid(dot + cfg.remix_bias)))
    n_views = max(0.0, cfg.n_events - sum(len(p[0]) for p in side)) / (1.0 + rate)
    parts = _organic(pop, feats, cj, posted, exposure, n_views, cfg, r_view) + side

    ts_us = np.rint(np.concatenate([p[0] for p in parts]) * 1e6).astype(np.int64)
    kind = np.concatenate([p[3] for p in parts])
    order = np.argsort(ts_us * 4 + kind, kind="stable")  # a view sorts before its reactions
    events = pa.table({
        "event_id": np.arange(order.size, dtype=np.int64),
        "ts": pa.array(ts_us[order] + EPOCH_US, type=TS_TYPE),
        "user_id": np.concatenate([p[1] for p in parts])[order],
        "image_id": ids[np.concatenate([p[2] for p in parts])[order]],
        "event_type": pa.DictionaryArray.from_arrays(kind[order], pa.array(EVENT_TYPES)),
    })  # fmt: skip

    n = cfg.n_users
    follower_count = np.zeros(n, dtype=np.int64)
    follower_count[pop.creators] = pop.followers
    users = pa.table({"user_id": np.arange(n, dtype=np.int64), "follower_count": follower_count})
    images_out = images.drop_columns(
        [c for c in ("creator_id", "posted_at") if c in images.column_names]
    )  # re-simulating over a logs.images table replaces its creators and times
    images_out = images_out.append_column("creator_id", pa.array(pop.creators[cj])).append_column(
        "posted_at", pa.array(np.rint(posted * 1e6).astype(np.int64) + EPOCH_US, type=TS_TYPE)
    )
    appeal = _appeal(pop, feats, cfg, r_truth)
    prompt = images["prompt_id"].to_numpy().astype(np.int64)
    by_prompt = np.lexsort((-appeal, prompt))
    sp = prompt[by_prompt]
    start = np.maximum.accumulate(np.where(np.r_[True, sp[1:] != sp[:-1]], np.arange(n_img), 0))
    rank = np.empty(n_img, dtype=np.int32)
    rank[by_prompt] = np.arange(n_img) - start + 1
    truth_images = pa.table({
        "image_id": ids, "prompt_id": prompt, "appeal": appeal, "appeal_rank_in_prompt": rank,
        "expected_views": exposure * (n_views / exposure.sum()),
        "bot_targeted": np.isin(cj, promoted), "self_remixed": pop.self_remixer[cj],
    })  # fmt: skip
    is_creator = np.zeros(n, dtype=bool)
    is_creator[pop.creators] = True
    self_remixer = np.zeros(n, dtype=bool)
    self_remixer[pop.creators] = pop.self_remixer
    names = FEATURE_NAMES if len(mu) == len(FEATURE_NAMES) else [str(k) for k in range(len(mu))]
    truth_users = pa.table({
        "user_id": np.arange(n, dtype=np.int64), "is_bot": pop.is_bot, "is_creator": is_creator,
        "is_self_remixer": self_remixer, "activity": pop.activity,
        **{f"taste_{name}": pop.taste[:, k] for k, name in enumerate(names)},
    })  # fmt: skip
    return CommunityLogs(users, images_out, events, truth_images, truth_users)


def grouped_pairwise_agreement(
    scores: np.ndarray, truth: np.ndarray, groups: np.ndarray
) -> tuple[float, int]:
    """Fraction of within-group pairs that ``scores`` order like ``truth``.

    Pairs with equal truth are skipped; score ties count one half. Meant for groups (prompts)
    of up to a few thousand items.

    Args:
        scores: (N,) estimated scores.
        truth: (N,) true values.
        groups: (N,) group ids (e.g. prompt_id).

    Returns:
        (agreement in [0, 1], number of pairs compared); (nan, 0) if there is no pair.
    """
    order = np.argsort(groups, kind="stable")
    s, t, g = scores[order], truth[order], groups[order]
    _, starts, sizes = np.unique(g, return_index=True, return_counts=True)
    good = total = 0.0
    for k in np.unique(sizes[sizes > 1]):
        rows = starts[sizes == k][:, None] + np.arange(k)  # (G, k) positions
        i, j = np.triu_indices(k, 1)
        dt = t[rows][:, i] - t[rows][:, j]
        ds = s[rows][:, i] - s[rows][:, j]
        valid = dt != 0
        total += valid.sum()
        good += (valid & (np.sign(dt) == np.sign(ds))).sum() + 0.5 * (valid & (ds == 0)).sum()
    return (good / total if total else float("nan")), int(total)


def pairwise_truth_agreement(logs: CommunityLogs) -> dict[str, float]:
    """How well naive and curated remix signals order images of a prompt like the truth.

    ``naive``: raw remix counts (bots, self-remixes, every exposure bias included).
    ``curated``: remixes per view, both counted without bot users (from ``truth_users``) and
    without the creator's own events. Needs the truth tables.

    Args:
        logs: simulated logs with ``truth_images`` and ``truth_users``.

    Returns:
        {"naive": agreement, "curated": agreement, "pairs": number of pairs compared}.
    """
    if logs.truth_images is None or logs.truth_users is None:
        raise ValueError("pairwise_truth_agreement: logs have no truth tables")
    ids = logs.images["image_id"].to_numpy()
    sorter = np.argsort(ids)
    ev = logs.events
    row = sorter[np.searchsorted(ids, ev["image_id"].to_numpy(), sorter=sorter)]
    kind = _event_codes(ev["event_type"])
    user = ev["user_id"].to_numpy()
    bots = logs.truth_users.filter(logs.truth_users["is_bot"])["user_id"].to_numpy()
    keep = ~np.isin(user, bots) & (user != logs.images["creator_id"].to_numpy()[row])
    n = len(ids)
    naive = np.bincount(row[kind == 2], minlength=n).astype(np.float64)
    views = np.bincount(row[(kind == 0) & keep], minlength=n)
    curated = np.bincount(row[(kind == 2) & keep], minlength=n) / np.maximum(views, 1)
    truth = logs.truth_images
    t_row = sorter[np.searchsorted(ids, truth["image_id"].to_numpy(), sorter=sorter)]
    appeal = np.empty(n)
    appeal[t_row] = truth["appeal"].to_numpy()
    prompt = logs.images["prompt_id"].to_numpy()
    a_naive, pairs = grouped_pairwise_agreement(naive, appeal, prompt)
    a_curated, _ = grouped_pairwise_agreement(curated, appeal, prompt)
    return {"naive": a_naive, "curated": a_curated, "pairs": pairs}


def _event_codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """event_type (string or dictionary) -> int8 codes: view 0, like 1, remix 2, other -1."""
    codes = pc.index_in(column.cast(pa.string()), value_set=pa.array(EVENT_TYPES))
    return pc.fill_null(codes, -1).to_numpy().astype(np.int8)


def expected_appeal(
    features: np.ndarray,
    config: CommunityConfig | None = None,
    n_users: int = 20_000,
    seed: int = 0,
) -> np.ndarray:
    """The community's ground-truth appeal of any images, from their appearance features.

    The same quantity as the truth tables' ``appeal`` (mean over non-bot users of
    ``sigmoid(remix_bias + w_u . f)``), with the users' tastes drawn afresh from the
    community's taste distribution ``N(taste_mean, taste_heterogeneity^2 I)`` (``n_users`` of
    them, fixed by ``seed``), so images that were never posted (generated ones) get it too.

    Args:
        features: (N, F) appearance features (``appearance.appearance_features``).
        config: the community (default: ``CommunityConfig()``, the demo's taste).

    Returns:
        (N,) float64 expected remixes per view, in (0, 1).
    """
    cfg = config if config is not None else CommunityConfig()
    feats = np.asarray(features, dtype=np.float32)
    mu = np.asarray(cfg.taste_mean if cfg.taste_mean is not None else DEFAULT_TASTE_MEAN)
    if feats.ndim != 2 or feats.shape[1] != len(mu):
        raise ValueError(f"features: expected (N, {len(mu)}); got shape {feats.shape}")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_users, len(mu)), dtype=np.float32)
    taste = (mu[None, :] + np.float32(cfg.taste_heterogeneity) * z).astype(np.float32)
    logits = taste @ feats.T + np.float32(cfg.remix_bias)  # (U, N)
    return _sigmoid(logits).mean(axis=0, dtype=np.float64)
