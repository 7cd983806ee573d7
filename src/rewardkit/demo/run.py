"""``rewardkit demo``: the whole loop on the embedded default, ending in ``report.html``.

Stages so far (later stages append their sections):
1. AdWorld: render a labelled sample, label it with the oracle, check the oracle against the
   render truth on clean and degraded images.
2. Community: render an image pool, simulate a community reacting to it, summarise its logs.
3. RFNet: the shipped inspector and its image-only baseline on the renders of stage 1.
4. Social Reward: curate pairs from the logs, tune a reward model briefly, compare the
   shipped scorers on held-out prompts against the community's true appeal.
5. Generation: the shipped generator on new products, first attempts vs Recurrent
   Generation with the shipped inspector as the accept test, judged by the oracle too.
"""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import numpy as np

from rewardkit.io import read_image_rgb, write_json_atomic, write_text_atomic
from rewardkit.report.html import card, esc, figure_tag, page, table_html
from rewardkit.world.agreement import oracle_agreement
from rewardkit.world.export import label_manifest, render_world
from rewardkit.world.oracle import MEASUREMENTS, thresholds_table
from rewardkit.world.scene import CLASSES
from rewardkit.world.simulate import community_summary, simulate_pool

PROMPTS = 100  # community prompts: 10 held out for evaluation, 80 give training pairs
DEMO_TRAIN_STEPS = 150  # a short reward-tuning run: the loop working, not the shipped model


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def world_section(out: Path, n: int, seed: int, timings: dict) -> tuple[str, dict]:
    t = time.perf_counter()
    manifest = render_world(out / "world", n, seed, size=64, progress=False)
    timings["render"] = time.perf_counter() - t
    t = time.perf_counter()
    labels, errors = label_manifest(
        out / "world" / "manifest.parquet", out / "world" / "oracle.parquet", progress=False
    )
    timings["label"] = time.perf_counter() - t
    truth = manifest.column("label").to_pylist()
    pred = labels.column("oracle_label").to_pylist()
    agree = sum(a == b for a, b in zip(truth, pred, strict=True)) / len(truth)
    t = time.perf_counter()
    degraded = oracle_agreement(min(n, 300), seed=seed + 1, size=64, degraded=True)
    timings["degraded_check"] = time.perf_counter() - t

    counts = {c: truth.count(c) for c in CLASSES}
    conf = [
        [c]
        + [sum(1 for a, b in zip(truth, pred, strict=True) if a == c and b == p) for p in CLASSES]
        for c in CLASSES
    ]
    rows = manifest.to_pylist()
    meas = labels.to_pylist()
    gallery = []
    for c in CLASSES:
        idx = [i for i, r in enumerate(rows) if r["label"] == c][:7]
        cards = []
        for i in idx:
            img = read_image_rgb(out / "world" / rows[i]["path"])
            m = meas[i]
            lines = [
                f"oracle: {m['oracle_label']}",
                f"defect: {rows[i]['defect'] or '-'}",
                f"gap {m['contact_gap']:+.3f} contrast {m['contrast']:.2f}",
                f"clutter {m['clutter']:.2f} halluc {m['hallucinated_area']:.2f}",
                f"scale err {m['scale_error']:+.2f}"
                if m["scale_error"] == m["scale_error"]
                else "no reference prop",
            ]
            cards.append(card(img, lines))
        gallery.append(f"<h3>{c} ({counts[c]})</h3><div class='grid'>{''.join(cards)}</div>")
    body = (
        f"<p>{n} renders at 64 px (seed {seed}), class balance uniform. The oracle judged every "
        f"image from pixels, the product photo and its placement only.</p>"
        f"<p><b>Oracle agreement with render truth: {agree:.1%}</b> on these renders; "
        f"<b>{degraded['agreement']:.1%}</b> on {degraded['n']} blurred, noised and "
        f"JPEG-compressed renders. Unreadable rows skipped: {errors}.</p>"
        + table_html(["truth \\ oracle"] + list(CLASSES), conf)
        + "<h3>Thresholds</h3>"
        + table_html(["threshold", "value"], thresholds_table().items())
        + "".join(gallery)
    )
    stats = {
        "n": n,
        "per_class": counts,
        "oracle_agreement": agree,
        "oracle_agreement_degraded": degraded["agreement"],
        "skipped": errors,
        "measurements": list(MEASUREMENTS),
    }
    return body, stats


def community_section(
    out: Path, users: int, seed: int, timings: dict, prompts: int = PROMPTS
) -> tuple[str, dict]:
    plt = _plt()
    t = time.perf_counter()
    logs = simulate_pool(
        out / "community", users, seed, prompts=prompts, images_per_prompt=12, progress=False
    )
    timings["community"] = time.perf_counter() - t
    summary = community_summary(logs, out / "community")
    con = duckdb.connect()
    con.register("events", logs.events)
    con.register("images", logs.images)
    con.register("truth", logs.truth_images)
    con.register("users", logs.users)
    per_image = con.execute("""
        SELECT i.image_id, i.prompt_id, t.appeal, u.follower_count,
               count(*) FILTER (WHERE e.event_type = 'view') AS views,
               count(*) FILTER (WHERE e.event_type = 'remix') AS remixes
        FROM images i JOIN truth t USING (image_id)
        JOIN users u ON u.user_id = i.creator_id
        LEFT JOIN events e USING (image_id)
        GROUP BY ALL ORDER BY i.image_id
    """).fetchnumpy()
    followers = con.execute(
        "SELECT follower_count FROM users WHERE follower_count > 0"
    ).fetchnumpy()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    f = np.sort(followers["follower_count"])[::-1]
    ax[0].loglog(np.arange(1, len(f) + 1), f)
    ax[0].set(title="creators' followers (rank-size)", xlabel="rank", ylabel="followers")
    ax[1].scatter(
        per_image["appeal"],
        per_image["remixes"],
        s=6,
        alpha=0.5,
        c=np.log1p(per_image["follower_count"]),
        cmap="viridis",
    )
    ax[1].set(
        title="raw remixes vs true appeal\n(colour: log creator followers)",
        xlabel="appeal",
        ylabel="remixes",
        yscale="symlog",
    )
    ax[2].hist(per_image["views"], bins=40, log=True)
    ax[2].set(title="views per image (exposure)", xlabel="views")
    plots = figure_tag(fig)
    # Example prompt: its images ordered by true appeal.
    pool = out / "community"
    pid = int(per_image["prompt_id"][0])
    sel = np.nonzero(per_image["prompt_id"] == pid)[0]
    sel = sel[np.argsort(-per_image["appeal"][sel])]
    paths = dict(
        zip(logs.images["image_id"].to_pylist(), logs.images["path"].to_pylist(), strict=True)
    )
    cards = "".join(
        card(
            read_image_rgb(pool / paths[int(per_image["image_id"][i])]),
            [
                f"appeal {per_image['appeal'][i]:.3f}",
                f"views {per_image['views'][i]}",
                f"remixes {per_image['remixes'][i]}",
            ],
        )
        for i in sel
    )
    agreement = summary["pairwise_truth_agreement"]
    ev = summary["events_by_type"]
    body = (
        f"<p>{summary['users']:,} users, {summary['images']:,} images in {prompts} prompts, "
        f"{summary['events']:,} events ({', '.join(f'{k}: {v:,}' for k, v in ev.items())}).</p>"
        + plots
        + "<p>Within a prompt, how often does a signal order two images like their true appeal? "
        f"Raw remix counts: <b>{agreement['naive']:.1%}</b>; remixes per view without bots and "
        f"self-remixes (using the truth tables, an upper bound for curation): "
        f"<b>{agreement['curated']:.1%}</b> over {agreement['pairs']:,} pairs. The gap is the "
        "bias that curation has to remove.</p>"
        f"<h3>One prompt, images by true appeal</h3><p class='muted'>"
        f"{logs.images['prompt'][int(sel[0])]}</p><div class='grid'>{cards}</div>"
    )
    return body, summary


def held_out_note(overlap) -> str:
    """One report line saying whether the stage's data was held out from every model."""
    if overlap.seen_rows == 0:
        text = (
            f"Held out: none of these {overlap.rows} {overlap.kind}s was seen by a model in "
            "training or model choice (checked by content keys)."
        )
    else:
        text = f"NOT held out (--allow-overlap): {overlap.describe()}."
    if overlap.unknown:
        text += f" No training keys recorded for: {', '.join(overlap.unknown)}."
    return f"<p class='muted'>{esc(text)}</p>"


def run_demo(
    out_dir: str | Path,
    n: int = 240,
    users: int = 20000,
    seed: int = 0,
    train_steps: int = DEMO_TRAIN_STEPS,
    prompts: int = PROMPTS,
    gen_products: int = 24,
    gen_attempts: int = 8,
    gen_steps: int | None = None,
    generator: str | Path | None = None,
    rfft_products: int = 16,
    allow_overlap: bool = False,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> Path:
    """Run every stage on the embedded default and write ``out_dir/report.html``.

    Every stage checks that its products and prompts are ones no shipped model trained or
    was chosen on (``rewardkit.data.keys``) and says so in the report; a seed whose data
    overlaps (e.g. 101, the pre-training renders) raises ``OverlapError`` unless
    ``allow_overlap``. Every model runs (and the reward tuning trains) on ``device`` at
    ``mixed_precision`` (``rewardkit.commands.devices``)."""
    from rewardkit.demo.generation import generation_section
    from rewardkit.demo.reward import reward_section
    from rewardkit.demo.rfft import rfft_section
    from rewardkit.demo.rfnet import rfnet_section

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    world_body, world_stats = world_section(out, n, seed, timings)
    where = {"device": device, "mixed_precision": mixed_precision}
    rfnet_body, rfnet_stats = rfnet_section(out, timings, allow_overlap, **where)
    comm_body, comm_stats = community_section(out, users, seed, timings, prompts)
    reward_body, reward_stats = reward_section(
        out, out / "community", train_steps, timings, allow_overlap, **where
    )
    gen_body, gen_stats = generation_section(
        out, timings, gen_products, gen_attempts, gen_steps, generator=generator,
        allow_overlap=allow_overlap, **where,
    )  # fmt: skip
    rfft_body, rfft_stats = rfft_section(
        out, timings, products=rfft_products, steps=gen_steps, allow_overlap=allow_overlap,
        **where,
    )  # fmt: skip
    timings["total"] = time.perf_counter() - t0
    html = page(
        "rewardkit demo",
        [
            ("AdWorld: renders and the oracle", world_body),
            ("RFNet: the inspector on new products", rfnet_body),
            ("AdWorld community: implicit feedback logs", comm_body),
            ("Social Reward: from remix logs to a reward model", reward_body),
            ("Ad generation and Recurrent Generation", gen_body),
            ("RFFT: the generator fine-tuned with reward gradients", rfft_body),
            ("Run", table_html(["stage", "seconds"], [(k, v) for k, v in timings.items()])),
        ],
        subtitle=f"seed {seed}; everything offline on the embedded default",
    )
    path = out / "report.html"
    write_text_atomic(path, html)
    summary = {
        "world": world_stats,
        "rfnet": rfnet_stats,
        "community": comm_stats,
        "social_reward": reward_stats,
        "generation": gen_stats,
        "rfft": rfft_stats,
        "seconds": timings,
    }
    write_json_atomic(out / "summary.json", summary)
    return path
