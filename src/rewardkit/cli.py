"""The ``rewardkit`` command line: thin parsing over library functions.

``main(argv)`` returns an exit code, so tests call it directly. Errors in the user's input
(bad parameters, missing files or columns) print one line naming what is wrong and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rewardkit.io import to_strict_json


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v

    return parse


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _unit_interval(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return v


def _ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--engine local|ray`` and the Ray options (refused without ``--engine ray``)."""
    parser.add_argument(
        "--engine", default="local", choices=("local", "ray"),
        help=f"local (this process) or ray ({what})",
    )  # fmt: skip
    parser.add_argument(
        "--ray-address", default=None,
        help="Ray cluster address (with --engine ray; default: a local Ray)",
    )  # fmt: skip
    parser.add_argument(
        "--actors", type=_positive(int), default=None, help="Ray actors (--engine ray; default 2)"
    )
    parser.add_argument(
        "--gpus-per-actor", type=_non_negative_float, default=None,
        help="GPUs each Ray actor holds (--engine ray; default 0: CPU actors)",
    )  # fmt: skip


def _ray_options(a: argparse.Namespace) -> dict:
    """The Ray options of a command line: refused (one line) without ``--engine ray``."""
    given = [f for f, v in (("--ray-address", a.ray_address), ("--actors", a.actors),
                            ("--gpus-per-actor", a.gpus_per_actor)) if v is not None]  # fmt: skip
    if a.engine != "ray":
        if given:
            raise ValueError(f"{', '.join(given)}: only used with --engine ray")
        return {}
    return {
        "address": a.ray_address,
        "actors": 2 if a.actors is None else a.actors,
        "gpus_per_actor": 0.0 if a.gpus_per_actor is None else a.gpus_per_actor,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rewardkit",
        description="Human feedback on generated images -> reward models -> better generation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="AdWorld: the procedural ad world, oracle and community")
    wsub = world.add_subparsers(dest="world_command", required=True)

    r = wsub.add_parser("render", help="render N labelled ad images in an RF1M-like layout")
    r.add_argument("--n", type=_positive(int), required=True, help="number of images")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--size", type=_positive(int), default=64, help="image side in pixels")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument(
        "--balance",
        default=None,
        help='class weights, e.g. "Available=0.5,Space Mismatch=0.1" (default uniform)',
    )
    r.add_argument("--fill", type=float, default=None, help="product size / frame (default 0.4)")
    r.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="share of items labelled by the oracle, their Space/Size Mismatch drawn across "
        "its threshold (boundary cases for training inspectors; default 0)",
    )

    lab = wsub.add_parser("label", help="run the oracle over the images of a manifest")
    lab.add_argument("--manifest", required=True, help="Parquet with path, product_path, ...")
    lab.add_argument("--out", required=True, help="output Parquet, one row per image")
    lab.add_argument(
        "--training-manifest", default=None,
        help="also write the judged rows with label = the oracle's verdict, a manifest that "
        "`train rfnet --manifest` takes (the data loop: generate, label, train the inspector)",
    )  # fmt: skip

    c = wsub.add_parser("community", help="simulate a creative community and its event logs")
    c.add_argument("--users", type=_positive(int), required=True)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    c.add_argument("--prompts", type=_positive(int), default=100, help="prompts in the pool")
    c.add_argument("--images-per-prompt", type=_positive(int), default=12)
    c.add_argument("--size", type=_positive(int), default=64)
    c.add_argument(
        "--events",
        type=_positive(int),
        default=None,
        help="approximate number of events (default: about 10 per user)",
    )

    s = sub.add_parser("score", help="score a folder of images or a manifest with a scorer")
    s.add_argument(
        "--model",
        default=None,
        help="the scorer's folder (default: the embedded default of --scorer)",
    )
    s.add_argument("--input", required=True, help="image folder, or Parquet manifest with path")
    s.add_argument("--out", required=True, help="output Parquet (path, prompt, score, ...)")
    s.add_argument(
        "--scorer",
        default="social-reward",
        help="a registered scorer: social-reward, clip-score, pickscore, aesthetic, ...",
    )
    s.add_argument("--batch-size", type=_positive(int), default=32)
    _ray_arguments(s, "decoding tasks and a pool of scorer actors")
    s.add_argument(
        "--workers", type=_non_negative_int, default=2,
        help="DataLoader processes decoding the next batches while the model runs "
        "(default 2; 0: decode in this process)",
    )  # fmt: skip
    s.add_argument("--prompt", default="", help="prompt for a folder, or rows without one")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    cu = sub.add_parser("curate", help="curate community event logs into preference pairs")
    cu.add_argument("--events", required=True, help="log folder (users, images, events/)")
    cu.add_argument(
        "--config", default=None, help="curation YAML (default: the packaged default rules)"
    )
    cu.add_argument(
        "--out", required=True,
        help="output Parquet of preference pairs (with --engine spark: a Parquet folder "
        "partitioned by split)",
    )  # fmt: skip
    cu.add_argument(
        "--engine", default="duckdb", choices=("duckdb", "spark"),
        help="SQL engine for the same rules: duckdb (embedded, default) or spark",
    )  # fmt: skip
    cu.add_argument(
        "--spark-master", default=None,
        help="Spark master URL (local[2], spark://host:7077; default: this machine, "
        "or the master spark-submit set)",
    )  # fmt: skip

    train = sub.add_parser("train", help="train a model: reward (pairs), contrastive (captions)")
    tsub = train.add_subparsers(dest="train_command", required=True)
    t = tsub.add_parser("reward", help="tune a reward model on preference pairs")
    t.add_argument("--pairs", required=True, help="pairs Parquet from `rewardkit curate`")
    t.add_argument("--out", required=True, help="run folder: model/, checkpoint/, summary")
    t.add_argument("--model", default=None, help="start from (default: embedded dual encoder)")
    t.add_argument("--config", default=None, help="training YAML (RewardTrainConfig fields)")
    _train_overrides(t, losses=True)

    pt = tsub.add_parser("contrastive", help="CLIP pre-training on a manifest's image-texts")
    pt.add_argument("--manifest", required=True, help="Parquet with path and prompt columns")
    pt.add_argument("--out", required=True, help="run folder: model/, checkpoint/, summary")
    pt.add_argument(
        "--model", default=None, help="start from (default: a new small vision tower + MiniLM)"
    )
    pt.add_argument("--config", default=None, help="training YAML (PretrainConfig fields)")
    _train_overrides(pt, losses=False)

    rf = tsub.add_parser("rfnet", help="train the RFNet inspector on labelled ad images")
    rf.add_argument(
        "--manifest", required=True, nargs="+",
        help="AdWorld manifest.parquet or RF1M folder; several are concatenated "
        "(e.g. renders and oracle-labelled generated images), split by product together",
    )  # fmt: skip
    rf.add_argument("--out", required=True, help="run folder (with --ablation: one per variant)")
    rf.add_argument("--config", default=None, help="training YAML (RFNetTrainConfig fields)")
    rf.add_argument(
        "--model-config", default=None,
        help="RFNet architecture: a YAML of RFNetConfig fields, or a preset: small (default), "
        "paper (the published sizes), aligned (early fusion of the generated image with the "
        "product as placed, beyond the paper)",
    )  # fmt: skip
    rf.add_argument("--variant", default="full", help="full, image-only, no-<modality>")
    rf.add_argument(
        "--ablation", action="store_true", help="train full, image-only and every no-<modality>"
    )
    rf.add_argument("--maps", default="predicted", help="depth/saliency: predicted or truth")
    rf.add_argument(
        "--init", default=None,
        help="start from this RFNet folder (fine-tune, e.g. on generated images); "
        "its architecture is kept",
    )  # fmt: skip
    rf.add_argument(
        "--accept-precision", type=_unit_interval, default=None,
        help="the operating point: the model calls an image Available when P(Available) >= "
        "the threshold with the highest recall at this Available precision on the validation "
        "split (written into its config; inspect, generate --until-accepted and serve follow "
        "it). Default: the most probable class",
    )  # fmt: skip
    _train_overrides(rf, losses=False, presets=False)

    tg = tsub.add_parser("generator", help="train the small SD + ControlNet ad generator")
    tg.add_argument("--manifest", required=True, help="AdWorld render manifest (the scenes)")
    tg.add_argument("--out", required=True, help="run folder: vae/, diffusion/, model/")
    tg.add_argument("--probe", default=None, help="manifest of held-out products to probe")
    tg.add_argument("--probe-size", type=_positive(int), default=64)
    tg.add_argument("--probe-every", type=int, default=400, help="steps between probes")
    tg.add_argument("--vae-steps", type=_positive(int), default=600)
    tg.add_argument("--vae-batch-size", type=_positive(int), default=8)
    tg.add_argument("--vae-lr", type=float, default=1e-3)
    tg.add_argument(
        "--decoder-steps", type=int, default=0,
        help="then fine-tune the VAE decoder alone for N steps (latents unchanged)",
    )  # fmt: skip
    tg.add_argument("--max-steps", type=_positive(int), default=2500, help="diffusion steps")
    tg.add_argument("--batch-size", type=_positive(int), default=32)
    tg.add_argument("--lr", type=float, default=5e-4)
    tg.add_argument("--seed", type=int, default=0)
    tg.add_argument(
        "--grad-accum", type=_positive(int), default=1,
        help="micro-steps per optimiser step of every stage (batch sizes stay global)",
    )  # fmt: skip
    tg.add_argument(
        "--export-checkpoint", action="store_true",
        help="write model/ from the run's latest checkpoint (EMA weights) and stop",
    )  # fmt: skip
    tg.add_argument(
        "--init-from", default=None, metavar="DIR",
        help="warm start from this generator folder: its VAE, text encoder and weights "
        "(no VAE stage); with --cross-attention, the added attention levels start as the "
        "identity",
    )  # fmt: skip
    tg.add_argument(
        "--cross-attention", default=None, metavar="SIZES",
        help="latent sizes of the UNet levels with cross-attention, e.g. 16,8 (default: 8, "
        "the lowest level of the embedded generator)",
    )  # fmt: skip
    tg.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("generate", help="generate ad images around product photos")
    g.add_argument("--products", required=True, help="folder of product photos, or a manifest")
    g.add_argument("--out", required=True, help="output folder (images, attempts, manifests)")
    g.add_argument("--generator", default=None, help="pipeline folder (default: embedded)")
    gp = g.add_mutually_exclusive_group()
    gp.add_argument("--prompt", default=None, help="one prompt for every product")
    gp.add_argument("--prompts", default=None, help="file with one prompt per line")
    g.add_argument("--until-accepted", action="store_true", help="Recurrent Generation")
    g.add_argument("--inspector", default=None, help="RFNet folder (default: embedded)")
    g.add_argument(
        "--judge", default="inspector", choices=("inspector", "oracle"),
        help="accept test: the RFNet inspector, or AdWorld's oracle (measurement)",
    )  # fmt: skip
    g.add_argument(
        "--accept-threshold", type=float, default=None,
        help="Recurrent Generation's accept test: Available when the inspector's "
        "P(Available) >= T (default: the inspector's loop_threshold, else its operating "
        "point; stats.json records the one used); stricter costs "
        "attempts and buys precision",
    )  # fmt: skip
    g.add_argument("--max-attempts", type=_positive(int), default=8)
    g.add_argument("--batch-size", type=_positive(int), default=16)
    g.add_argument("--steps", type=_positive(int), default=None, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=_positive(int), default=None, help="first N products only")
    _ray_arguments(g, "products sharded over a pool of generator actors")
    g.add_argument("--no-progress", action="store_true")

    ft = sub.add_parser("finetune", help="RFFT: fine-tune the generator with a reward's gradient")
    ft.add_argument("--generator", default=None, help="pipeline folder (default: embedded)")
    ft.add_argument(
        "--reward", default="rfnet",
        help="rfnet[:DIR[,DIR...]] (F_AC towards Available; several folders: an ensemble, "
        "losses averaged) or social[:DIR] (Social Reward score)",
    )  # fmt: skip
    ft.add_argument(
        "--reward-views", type=_positive(int), default=1,
        help="RFNet: judge each image also in N-1 copies shifted by up to 2 px with light "
        "noise and average (against reward hacking)",
    )  # fmt: skip
    ft.add_argument("--regularizer", default="cc", choices=("cc", "kl", "none"))
    ft.add_argument("--beta", type=float, default=1.0, help="weight of the regulariser")
    ft.add_argument(
        "--kl-beta", type=float, default=0.0,
        help="with --regularizer cc: also a KL term of this weight (CC keeps the prompt's "
        "guidance direction, KL the predictions themselves)",
    )  # fmt: skip
    ft.add_argument("--products", required=True, help="training products: manifest or folder")
    ft.add_argument("--out", required=True, help="run folder: checkpoint/, curves, model/")
    ft.add_argument(
        "--probe", default=None, help="probe products (default: held out of --products)"
    )
    ft.add_argument("--probe-size", type=_positive(int), default=32)
    ft.add_argument("--probe-every", type=int, default=50, help="steps between probes")
    ft.add_argument(
        "--trainable", default="controlnet", choices=("controlnet", "lora", "all"),
        help="the ControlNet (as published), LoRA adapters on UNet and ControlNet, or all "
        "weights of both",
    )  # fmt: skip
    ft.add_argument("--lora-rank", type=_positive(int), default=8)
    ft.add_argument("--max-steps", type=_positive(int), default=200)
    ft.add_argument("--batch-size", type=_positive(int), default=4)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--steps", type=_positive(int), default=None, help="DDIM steps of a run")
    ft.add_argument("--grad-window", type=_positive(int), default=10, help="t among the last N")
    ft.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    ft.add_argument("--checkpoint-every", type=_positive(int), default=25)
    ft.add_argument("--no-grad-checkpoint", action="store_true", help="store activations")
    ft.add_argument("--limit", type=_positive(int), default=None, help="first N products only")
    ft.add_argument(
        "--replay", default=None,
        help="images with products and prompts (a `rewardkit generate` output or the "
        "generator's training renders, manifest or folder): the reward keeps the best "
        "--replay-top of them and their denoising loss is added (--replay-weight)",
    )  # fmt: skip
    ft.add_argument("--replay-top", type=float, default=0.3, help="share of --replay kept")
    ft.add_argument("--replay-weight", type=float, default=1.0)
    ft.add_argument("--replay-batch", type=_positive(int), default=8)
    ft.add_argument(
        "--reward-weight", type=float, default=1.0,
        help="weight of the reward loss (0 with --regularizer none: the replay loss alone)",
    )  # fmt: skip
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument(
        "--grad-accum", type=_positive(int), default=1,
        help="micro-steps per optimiser step; --batch-size stays the global batch",
    )  # fmt: skip
    ft.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="evaluate models: reward (scorers side by side), rfnet")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("reward", help="compare scorers on held-out prompts (pairs and truth)")
    e.add_argument("--community", required=True, help="community folder (images, truth/)")
    e.add_argument("--pairs", default=None, help="curated pairs; their split picks prompts")
    e.add_argument("--split", default="test", help="held-out split of --pairs")
    e.add_argument("--model", default=None, help="Social Reward folder (default: embedded)")
    e.add_argument(
        "--scorer",
        action="append",
        default=None,
        metavar="NAME[=DIR]",
        help="baseline scorer, repeatable (default: clip-score and aesthetic, embedded)",
    )
    e.add_argument("--k", type=_positive(int), default=1, help="k of the top-k hit rate")
    e.add_argument("--batch-size", type=_positive(int), default=64)
    e.add_argument("--out", default=None, help="write the table as JSON (and .md beside it)")
    e.add_argument(
        "--allow-overlap", action="store_true",
        help="report figures even when the data holds products/prompts the models trained "
        "or were chosen on (default: refuse, exit 2)",
    )  # fmt: skip

    er = esub.add_parser("rfnet", help="RFNet: P/R/F1/AP, confusion, baseline and ablation")
    er.add_argument("--manifest", required=True, help="held-out AdWorld manifest or RF1M folder")
    er.add_argument("--model", default=None, help="RFNet folder (default: embedded)")
    er.add_argument("--runs", default=None, help="a `train rfnet --ablation` folder: all tables")
    er.add_argument("--maps", default="predicted", help="depth/saliency: predicted or truth")
    er.add_argument("--seed", type=int, default=0, help="seed of the degraded copy")
    er.add_argument("--out", default=None, help="write the results as JSON (.md beside it)")
    er.add_argument(
        "--allow-overlap", action="store_true",
        help="report figures even when the data holds products/prompts the models trained "
        "or were chosen on (default: refuse, exit 2)",
    )  # fmt: skip

    eg = esub.add_parser("generator", help="generators side by side: available, diversity")
    eg.add_argument("--products", required=True, help="held-out AdWorld products (manifest)")
    eg.add_argument(
        "--model", action="append", default=None, metavar="NAME=DIR",
        help="a generator to evaluate (repeat; the first is the base; default: embedded)",
    )  # fmt: skip
    eg.add_argument("--out", required=True, help="folder for the table, JSON and grids")
    eg.add_argument("--inspector", default=None, help="RFNet folder (default: embedded)")
    eg.add_argument("--social", default=None, help="Social Reward folder (default: embedded)")
    eg.add_argument("--limit", type=_positive(int), default=200, help="products (one image each)")
    eg.add_argument("--seeds", type=_positive(int), default=4, help="seeds per diversity product")
    eg.add_argument("--diversity-products", type=_positive(int), default=24)
    eg.add_argument(
        "--recurrent-attempts", type=int, default=8,
        help="Recurrent Generation row for the base (0: none)",
    )  # fmt: skip
    eg.add_argument("--batch-size", type=_positive(int), default=32)
    eg.add_argument("--seed", type=int, default=0)
    eg.add_argument(
        "--allow-overlap", action="store_true",
        help="report figures even when the data holds products/prompts the models trained "
        "or were chosen on (default: refuse, exit 2)",
    )  # fmt: skip

    ins = sub.add_parser("inspect", help="RFNet verdicts for generated ad images")
    ins.add_argument("--model", default=None, help="RFNet folder (default: embedded)")
    ins.add_argument(
        "--input", required=True, help="manifest (path, product_path, caption) or folder"
    )
    ins.add_argument("--out", required=True, help="verdicts Parquet")
    ins.add_argument("--product", default=None, help="product photo, for a folder input")
    ins.add_argument("--caption", default=None, help="product caption, for a folder input")
    ins.add_argument(
        "--height-cm", type=_positive(float), default=None,
        help="product height in cm, for a folder input (read by early-fusion inspectors; "
        "default: 'N cm' in --caption)",
    )  # fmt: skip
    ins.add_argument(
        "--fill", type=_positive(float), default=None,
        help="longest product side / frame side the images were generated at, for a folder "
        "input (early-fusion inspectors; default: the generator's 0.4)",
    )  # fmt: skip
    ins.add_argument("--batch-size", type=_positive(int), default=64)
    ins.add_argument(
        "--workers", type=_non_negative_int, default=2,
        help="DataLoader processes decoding the next batches while the model runs "
        "(default 2; 0: decode in this process)",
    )  # fmt: skip
    _ray_arguments(ins, "decoding tasks and a pool of inspector actors")
    ins.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    d = sub.add_parser("demo", help="run the whole loop on the embedded default, write a report")
    d.add_argument("--out", required=True, help="output folder (report.html inside)")
    d.add_argument("--n", type=_positive(int), default=240, help="images to render and label")
    d.add_argument("--users", type=_positive(int), default=20000, help="community size")
    d.add_argument("--prompts", type=_positive(int), default=100, help="community prompts")
    d.add_argument(
        "--train-steps", type=_positive(int), default=150, help="steps of the reward-tuning run"
    )
    d.add_argument(
        "--gen-products", type=_positive(int), default=24, help="products to generate for"
    )
    d.add_argument(
        "--gen-attempts", type=_positive(int), default=8, help="Recurrent Generation budget"
    )
    d.add_argument(
        "--gen-steps",
        type=_positive(int),
        default=None,
        help="DDIM steps (default: the generator's)",
    )
    d.add_argument("--generator", default=None, help="generator folder (default: embedded)")
    d.add_argument(
        "--rfft-products", type=_positive(int), default=16,
        help="new products on which the original and fine-tuned generators are compared "
        "(two seeds each)",
    )  # fmt: skip
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--allow-overlap", action="store_true",
        help="report figures even when the data holds products/prompts the models trained "
        "or were chosen on (default: refuse, exit 2)",
    )  # fmt: skip
    for p in (s, t, pt, rf, tg, g, ft, e, er, eg, ins, d):  # every command that runs a model
        _device_flags(p)
    _serve_parsers(sub)
    return parser


def _serve_parsers(sub) -> None:
    """``serve`` (the HTTP service and review page) and ``labels export``."""
    sv = sub.add_parser("serve", help="score, inspect and generate over HTTP; the review page")
    sv.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default), 0.0.0.0 or ::")
    sv.add_argument("--port", type=_positive(int), default=8000)
    sv.add_argument(
        "--api-key", default=os.environ.get("REWARDKIT_API_KEY"),
        help="require this key (X-API-Key header) on /v1/* and /review/api/* "
        "(default: $REWARDKIT_API_KEY; none: open)",
    )  # fmt: skip
    sv.add_argument(
        "--endpoints", default="score,inspect,generate",
        help="which endpoints to load models for (the review page needs inspect)",
    )  # fmt: skip
    sv.add_argument("--scorer", default="social-reward", help="the /v1/score scorer")
    sv.add_argument("--model", default=None, help="the scorer's folder (default: embedded)")
    sv.add_argument("--inspector", default=None, help="RFNet folder (default: embedded)")
    sv.add_argument("--generator", default=None, help="generator folder (default: embedded)")
    sv.add_argument("--steps", type=_positive(int), default=None, help="DDIM steps")
    sv.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    sv.add_argument(
        "--gpus", type=_positive(int), default=1,
        help="with --device cuda: GPUs to spread the workers over (cuda:N pins one)",
    )  # fmt: skip
    sv.add_argument(
        "--workers-per-device", type=_positive(int), default=1,
        help="model worker processes per device and endpoint",
    )  # fmt: skip
    sv.add_argument("--api-servers", type=_positive(int), default=1, help="HTTP processes")
    sv.add_argument(
        "--batch-size", type=_positive(int), default=16,
        help="dynamic batching: requests combined into one forward (1: none)",
    )  # fmt: skip
    sv.add_argument(
        "--batch-timeout", type=float, default=0.01, help="seconds a batch waits to fill"
    )
    sv.add_argument(
        "--forward-batch", type=_positive(int), default=64, help="images per forward pass"
    )
    sv.add_argument("--max-body-mb", type=_positive(float), default=32.0, help="body limit")
    sv.add_argument(
        "--max-pixels", type=_positive(int), default=4096 * 4096, help="pixels per image"
    )
    sv.add_argument(
        "--max-images", "--max-batch", dest="max_images", type=_positive(int), default=64,
        help="images per request",
    )  # fmt: skip
    sv.add_argument(
        "--max-attempts", type=_positive(int), default=8,
        help="largest max_attempts a /v1/generate request may ask for",
    )  # fmt: skip
    sv.add_argument(
        "--timeout", type=_positive(float), default=120.0, help="seconds a request may queue"
    )
    sv.add_argument(
        "--db", default="sqlite:///rewardkit-serve/labels.db",
        help="SQLAlchemy URL of the review labels (default: a SQLite file)",
    )  # fmt: skip
    sv.add_argument(
        "--outputs", default="rewardkit-serve/outputs",
        help="folder for /v1/generate results (the review page lists them)",
    )  # fmt: skip
    sv.add_argument(
        "--review-root", action="append", default=None,
        help="folder whose manifests and images the review page may open (repeatable; "
        "default: the working folder; the outputs folder always)",
    )  # fmt: skip
    sv.add_argument(
        "--threads", type=_non_negative_int, default=0,
        help="torch threads per CPU worker (default 0: cores / workers)",
    )  # fmt: skip
    sv.add_argument("--log-level", default="warning", help="uvicorn log level")
    _device_flags(sv)

    lb = sub.add_parser("labels", help="review labels: export them as a training manifest")
    lsub = lb.add_subparsers(dest="labels_command", required=True)
    ex = lsub.add_parser("export", help="labelled images -> a manifest `train rfnet` takes")
    ex.add_argument("--out", required=True, help="output manifest (.parquet)")
    ex.add_argument(
        "--db", default="sqlite:///rewardkit-serve/labels.db",
        help="SQLAlchemy URL of the review labels (as `serve --db`)",
    )  # fmt: skip
    ex.add_argument(
        "--manifest", nargs="+", default=None,
        help="only items of these opened manifests (ids or paths)",
    )  # fmt: skip
    ex.add_argument("--reviewer", nargs="+", default=None, help="only these reviewers' labels")
    ex.add_argument(
        "--min-reviewers", type=_positive(int), default=1,
        help="only items labelled by at least N reviewers (the label is their majority)",
    )  # fmt: skip


def _device_flags(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--mixed-precision``: one model for every command
    (``rewardkit.commands.devices``)."""
    p.add_argument(
        "--device", default=None,
        help="torch device for every model and tensor: cpu, cuda, cuda:1, mps "
        "(default: cuda when available, else cpu)",
    )  # fmt: skip
    p.add_argument(
        "--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
        help="compute precision: training autocasts (fp32 weights), inference casts the "
        "generator and autocasts the rest; schedule arithmetic stays fp32 (default: no, or "
        "the training config's)",
    )  # fmt: skip


def _train_overrides(p: argparse.ArgumentParser, losses: bool, presets: bool = True) -> None:
    """Flags that override single fields of a training config."""
    if presets:
        p.add_argument("--preset", default=None, help="which layers learn (paper, all, ...)")
    p.add_argument("--epochs", type=_positive(int), default=None)
    p.add_argument("--max-steps", type=_positive(int), default=None)
    p.add_argument("--lr", type=_positive(float), default=None)
    p.add_argument("--batch-size", type=_positive(int), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--grad-accum", type=_positive(int), default=None,
        help="micro-steps per optimiser step; --batch-size stays the global batch "
        "(divisible by processes x N)",
    )  # fmt: skip
    p.add_argument(
        "--loader-workers", type=_non_negative_int, default=None,
        help="DataLoader processes that read the next batches ahead of each step (default "
        "0: the step reads its own rows)",
    )  # fmt: skip
    if losses:
        p.add_argument("--loss", default=None, help="triplet (paper) or bradley-terry")


def _train_config(cls, a: argparse.Namespace):
    import dataclasses

    config = cls.from_yaml(a.config) if a.config else cls()
    fields = (
        "preset", "epochs", "max_steps", "lr", "batch_size", "seed", "loss", "grad_accum",
        "loader_workers",
    )  # fmt: skip
    changes = {f: getattr(a, f) for f in fields if getattr(a, f, None) is not None}
    return dataclasses.replace(config, **changes)


def _world_render(a: argparse.Namespace) -> int:
    from rewardkit.world.export import render_world
    from rewardkit.world.placement import DEFAULT_FILL

    table = render_world(
        a.out, a.n, a.seed, a.size, a.balance, a.fill or DEFAULT_FILL, spread=a.spread
    )
    counts = {}
    for lab in table.column("label").to_pylist():
        counts[lab] = counts.get(lab, 0) + 1
    print(to_strict_json({"out": a.out, "images": table.num_rows, "per_class": counts}))
    return 0


def _world_label(a: argparse.Namespace) -> int:
    from rewardkit.world.export import label_manifest

    table, errors = label_manifest(a.manifest, a.out, training_out=a.training_manifest)
    summary: dict = {"out": a.out, "labelled": table.num_rows - errors, "skipped": errors}
    if a.training_manifest:
        summary["training_manifest"] = a.training_manifest
    if "label" in table.column_names:
        pairs = [
            (t, p)
            for t, p in zip(
                table.column("label").to_pylist(),
                table.column("oracle_label").to_pylist(),
                strict=True,
            )
            if p is not None and t is not None
        ]
        if pairs:
            summary["agreement_with_label"] = sum(t == p for t, p in pairs) / len(pairs)
    print(to_strict_json(summary))
    if errors:
        for e in table.column("error").to_pylist():
            if e:
                print(f"skipped: {e}", file=sys.stderr)
    return 0


def _world_community(a: argparse.Namespace) -> int:
    from rewardkit.world.simulate import community_summary, simulate_pool

    logs = simulate_pool(a.out, a.users, a.seed, a.prompts, a.images_per_prompt, a.size, a.events)
    summary = community_summary(logs, a.out)
    print(to_strict_json(summary))
    return 0


def _score(a: argparse.Namespace) -> int:
    from rewardkit.commands.devices import autocast
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.scorers import available_scorers, create_scorer
    from rewardkit.scoring import score_images

    if a.scorer not in available_scorers():
        raise ValueError(
            f"unknown scorer {a.scorer!r}; available: {', '.join(available_scorers())}"
        )
    model = a.model if a.model is not None else default_model_path(a.scorer)
    ray = _ray_options(a)
    if ray:
        from rewardkit.ray_engine import score_images_ray

        summary = score_images_ray(
            a.scorer, model, a.input, a.out, batch_size=a.batch_size, prompt=a.prompt,
            device=a.device, mixed_precision=a.mixed_precision or "no",
            progress=not a.no_progress, **ray,
        )  # fmt: skip
        print(to_strict_json(summary.to_dict()))
        return 0
    scorer = create_scorer(a.scorer, model, device=a.device)
    with autocast(a.device, a.mixed_precision):
        summary = score_images(
            scorer, a.input, a.out, batch_size=a.batch_size, prompt=a.prompt,
            progress=not a.no_progress, num_workers=a.workers,
        )  # fmt: skip
    print(to_strict_json(summary.to_dict()))
    for s in summary.skipped[:10]:
        print(f"skipped: {s.path}: {s.reason}", file=sys.stderr)
    if len(summary.skipped) > 10:
        print(f"skipped: ... {len(summary.skipped) - 10} more in {summary.skipped_report}",
              file=sys.stderr)  # fmt: skip
    return 0


def _curate(a: argparse.Namespace) -> int:
    from importlib import resources
    from pathlib import Path

    from rewardkit.data.curation import CurationConfig, curate

    config = a.config or resources.files("rewardkit.data").joinpath("curation_default.yaml")
    if a.spark_master is not None and a.engine != "spark":
        raise ValueError("--spark-master is only used with --engine spark")
    cfg = CurationConfig.from_yaml(Path(str(config)))
    result = curate(a.events, cfg, a.out, engine=a.engine, spark_master=a.spark_master)
    out = Path(a.out)
    summary = {
        "out": str(out),
        "engine": a.engine,
        "pairs": result.card["pairs_after_caps"],
        "pairs_per_split": result.card["pairs_per_split"],
        "card": str(out.with_name(out.stem + ".card.json")),
        "card_md": str(out.with_name(out.stem + ".card.md")),
        "config": str(config),
        "warnings": result.card["warnings"],
    }
    for note in result.card["notes"]:  # every rule that changed the log, also in the card
        print(f"rewardkit: note: {note}", file=sys.stderr)
    for warning in result.card["warnings"]:
        print(f"rewardkit: warning: {warning}", file=sys.stderr)
    print(to_strict_json(summary))
    return 0


def _train(a: argparse.Namespace) -> int:
    from rewardkit.commands.devices import for_training
    from rewardkit.models.defaults import default_model_path
    from rewardkit.training.reward import RewardTrainConfig, train_reward

    config = for_training(_train_config(RewardTrainConfig, a), a.device, a.mixed_precision)
    model = a.model or default_model_path("clip-score")
    result = train_reward(model, a.pairs, a.out, config)
    print(to_strict_json(_run_summary(result)))
    return 0


def _pretrain(a: argparse.Namespace) -> int:
    from pathlib import Path

    from rewardkit.commands.devices import for_training
    from rewardkit.models.social_reward import build_default_dual_encoder
    from rewardkit.training.reward import PretrainConfig, pretrain_contrastive

    config = for_training(_train_config(PretrainConfig, a), a.device, a.mixed_precision)
    model = a.model
    if model is None:
        model = Path(a.out) / "base"
        if not (model / "config.json").is_file():
            build_default_dual_encoder(model, seed=config.seed)
    result = pretrain_contrastive(model, a.manifest, a.out, config)
    print(to_strict_json(_run_summary(result)))
    return 0


def _run_summary(result) -> dict:
    return {
        "model": str(result.out_dir / "model"),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "metrics": result.metrics,
    }


def _eval(a: argparse.Namespace) -> int:
    from pathlib import Path

    from rewardkit.commands.devices import autocast
    from rewardkit.commands.eval_reward import compare_scorers
    from rewardkit.io import write_json_atomic, write_text_atomic
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.scorers import create_scorer

    specs = [("social-reward", a.model)]
    for spec in a.scorer if a.scorer is not None else ["clip-score", "aesthetic"]:
        name, _, folder = spec.partition("=")
        specs.append((name, folder or None))
    scorers, folders = {}, {}
    for name, folder in specs:
        label = name if folder is None else f"{name} ({Path(folder).name})"
        if label in scorers:
            raise ValueError(f"--scorer: {label!r} given twice")
        folders[label] = folder or default_model_path(name)
        scorers[label] = create_scorer(name, folders[label], device=a.device)
    with autocast(a.device, a.mixed_precision):
        table, _ = compare_scorers(
            scorers, a.community, a.pairs, split=a.split if a.pairs else None, k=a.k,
            batch_size=a.batch_size, models=folders, allow_overlap=a.allow_overlap,
        )  # fmt: skip
    print(table.to_markdown())
    print(table.held_out.describe())
    if a.out:
        out = Path(a.out)
        write_json_atomic(out, {"split": a.split, "k": a.k, "rows": table.rows,
                                "held_out": table.held_out.to_dict()})  # fmt: skip
        write_text_atomic(
            out.with_suffix(".md"), f"{table.to_markdown()}\n\n{table.held_out.describe()}\n"
        )
    return 0


def _train_rfnet(a: argparse.Namespace) -> int:
    from rewardkit.commands.devices import for_training
    from rewardkit.commands.rfnet import train_rfnet_command
    from rewardkit.training.rfnet import RFNetTrainConfig

    config = for_training(_train_config(RFNetTrainConfig, a), a.device, a.mixed_precision)
    summary = train_rfnet_command(
        a.manifest,
        a.out,
        config,
        a.model_config,
        a.variant,
        a.ablation,
        a.maps,
        init=a.init,
        accept_precision=a.accept_precision,
    )
    print(to_strict_json(summary))
    return 0


def _train_generator(a: argparse.Namespace) -> int:
    from rewardkit.commands.devices import for_training
    from rewardkit.training.generator import (
        DiffusionTrainConfig,
        VAETrainConfig,
        train_generator,
    )

    def placed(config):
        import dataclasses

        config = dataclasses.replace(config, grad_accum=a.grad_accum)
        return for_training(config, a.device, a.mixed_precision)

    arch = _generator_arch(a.cross_attention)
    if a.export_checkpoint:
        from rewardkit.training.generator import export_checkpoint

        model = export_checkpoint(a.out, arch if a.cross_attention else None)
        _record_generator_keys(a.out, a.manifest, a.probe)
        print(to_strict_json({"model": str(model)}))
        return 0
    summary = train_generator(
        a.manifest,
        a.out,
        arch,
        placed(
            VAETrainConfig(
                max_steps=a.vae_steps, batch_size=a.vae_batch_size, lr=a.vae_lr, seed=a.seed
            )
        ),
        placed(
            DiffusionTrainConfig(
                max_steps=a.max_steps,
                batch_size=a.batch_size,
                lr=a.lr,
                seed=a.seed,
                probe_every=a.probe_every,
            )
        ),
        probe_manifest=a.probe,
        probe_size=a.probe_size,
        progress=not a.no_progress,
        decoder_config=(
            placed(
                VAETrainConfig(
                    max_steps=a.decoder_steps, batch_size=a.vae_batch_size, lr=a.vae_lr, seed=a.seed
                )
            )
            if a.decoder_steps > 0
            else None
        ),  # fmt: skip
        init_from=a.init_from,
    )
    _record_generator_keys(a.out, a.manifest, a.probe)
    print(to_strict_json({k: summary[k] for k in ("rows", "vae", "diffusion")}))
    return 0


def _generator_arch(levels: str | None):
    """The embedded generator's architecture, with cross-attention at ``levels`` (latent
    sizes, "16,8") when given; a size that is no UNet level is a one-line error."""
    import dataclasses

    from rewardkit.generation.default import GeneratorArch

    arch = GeneratorArch()
    if not levels:
        return arch
    latent = arch.resolution // 2 ** (len(arch.vae_channels) - 1)
    sizes = [latent // 2**i for i in range(len(arch.unet_channels))]
    try:
        wanted = {int(x) for x in levels.split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"--cross-attention {levels!r}: expected sizes such as 16,8") from None
    unknown = sorted(wanted - set(sizes))
    if unknown or not wanted:
        raise ValueError(
            f"--cross-attention {levels!r}: {unknown or 'nothing'} is not a UNet level; "
            f"the levels are {','.join(map(str, sizes))}"
        )
    return dataclasses.replace(arch, cross_attention_levels=tuple(s in wanted for s in sizes))


def _record_generator_keys(out: str, manifest: str, probe: str | None) -> None:
    """Beside the trained generator: its training products and prompts, and the probe
    products it was watched on (selection). The main process alone writes."""
    from pathlib import Path

    from rewardkit.data.keys import TrainingKeys, write_training_keys
    from rewardkit.training.distributed import is_main_process

    if not is_main_process():
        return
    seen = TrainingKeys()
    seen.add_manifest(manifest, "train")
    if probe:
        seen.add_manifest(probe, "selection")
    write_training_keys(Path(out) / "model", seen)


def _finetune(a: argparse.Namespace) -> int:
    from rewardkit.commands.devices import for_training
    from rewardkit.commands.finetune import finetune_command
    from rewardkit.models.defaults import default_model_path
    from rewardkit.training.rfft import FinetuneConfig, parse_reward

    config = FinetuneConfig(
        lr=a.lr, batch_size=a.batch_size, max_steps=a.max_steps, seed=a.seed,
        checkpoint_every=a.checkpoint_every, reward=parse_reward(a.reward)[0],
        regularizer=a.regularizer, beta=a.beta, kl_beta=a.kl_beta, trainable=a.trainable,
        lora_rank=a.lora_rank,
        sample_steps=a.steps, guidance_scale=a.guidance, grad_window=a.grad_window,
        grad_checkpoint=not a.no_grad_checkpoint, probe_every=a.probe_every,
        probe_size=a.probe_size, reward_views=a.reward_views, reward_weight=a.reward_weight,
        replay_weight=a.replay_weight, replay_batch=a.replay_batch, replay_top=a.replay_top,
        grad_accum=a.grad_accum,
    )  # fmt: skip
    config = for_training(config, a.device, a.mixed_precision)
    summary = finetune_command(
        a.generator or default_model_path("generator"), a.reward, a.products, a.out, config,
        probe=a.probe, limit=a.limit, progress=not a.no_progress, replay=a.replay,
        device=a.device,
    )  # fmt: skip
    print(to_strict_json(summary))
    return 0


def _eval_generator(a: argparse.Namespace) -> int:
    from rewardkit.generation.evaluate import evaluate_generators, parse_models
    from rewardkit.models.defaults import default_model_path

    result = evaluate_generators(
        parse_models(a.model, default_model_path("generator")), a.products, a.out,
        inspector=a.inspector, social=a.social, limit=a.limit, seeds=a.seeds,
        diversity_products=a.diversity_products, recurrent_attempts=a.recurrent_attempts,
        batch_size=a.batch_size, seed=a.seed, allow_overlap=a.allow_overlap,
        device=a.device, mixed_precision=a.mixed_precision or "no",
    )  # fmt: skip
    print(to_strict_json(result))
    return 0


def _generate(a: argparse.Namespace) -> int:
    from rewardkit.commands.generate import generate_command
    from rewardkit.generation.run import sampler_for
    from rewardkit.models.defaults import default_model_path

    generator = a.generator or default_model_path("generator")
    ray = _ray_options(a)
    if ray:
        ray = {"engine": "ray", "ray_address": ray["address"], "actors": ray["actors"],
               "gpus_per_actor": ray["gpus_per_actor"]}  # fmt: skip
    stats = generate_command(
        generator, a.products, a.out, prompt=a.prompt, prompts_file=a.prompts,
        until_accepted=a.until_accepted, judge=a.judge, inspector=a.inspector,
        accept_threshold=a.accept_threshold, max_attempts=a.max_attempts, batch_size=a.batch_size,
        sampler=sampler_for(generator, a.steps, a.guidance), seed=a.seed, limit=a.limit,
        progress=not a.no_progress, device=a.device, mixed_precision=a.mixed_precision or "no",
        **ray,
    )  # fmt: skip
    print(to_strict_json(stats))
    return 0


def _eval_rfnet(a: argparse.Namespace) -> int:
    from rewardkit.commands.rfnet import eval_rfnet_command

    text = eval_rfnet_command(
        a.manifest, a.model, a.runs, a.maps, a.seed, a.out, allow_overlap=a.allow_overlap,
        device=a.device, mixed_precision=a.mixed_precision or "no",
    )  # fmt: skip
    print(text)
    return 0


def _inspect(a: argparse.Namespace) -> int:
    from rewardkit.commands.inspect import inspect_images, read_inspection_input
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.inspector import Inspector

    ray = _ray_options(a)
    rows = read_inspection_input(a.input, a.product, a.caption, a.height_cm, a.fill)
    model = a.model or default_model_path("rfnet")
    if ray:
        from rewardkit.ray_engine import inspect_images_ray

        summary, run = inspect_images_ray(
            model, rows, a.out, batch_size=a.batch_size,
            mixed_precision=a.mixed_precision or "no", progress=not a.no_progress, **ray,
        )  # fmt: skip
        print(to_strict_json({**summary.to_dict(), **run.info()}))
    else:
        inspector = Inspector.from_pretrained(model, a.device)
        summary = inspect_images(
            inspector, rows, a.out, batch_size=a.batch_size,
            mixed_precision=a.mixed_precision or "no", workers=a.workers,
            progress=not a.no_progress,
        )  # fmt: skip
        print(to_strict_json(summary.to_dict()))
    for s in summary.skipped[:10]:
        print(f"skipped: row {s['row']}: {s['path']}: {s['reason']}", file=sys.stderr)
    return 0


def _demo(a: argparse.Namespace) -> int:
    from rewardkit.demo import run_demo

    path = run_demo(
        a.out, n=a.n, users=a.users, seed=a.seed, train_steps=a.train_steps, prompts=a.prompts,
        gen_products=a.gen_products, gen_attempts=a.gen_attempts, gen_steps=a.gen_steps,
        generator=a.generator, rfft_products=a.rfft_products, allow_overlap=a.allow_overlap,
        device=a.device, mixed_precision=a.mixed_precision or "no",
    )  # fmt: skip
    print(f"report: {path}")
    return 0


def _serve(a: argparse.Namespace) -> int:
    from pathlib import Path

    from rewardkit.serve.app import run_server
    from rewardkit.serve.config import ServeConfig

    for flag in ("model", "inspector", "generator"):
        folder = getattr(a, flag)
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"--{flag} {folder}: no such model folder")
    config = ServeConfig(
        host=a.host, port=a.port, api_key=a.api_key or None, device=a.device, gpus=a.gpus,
        workers_per_device=a.workers_per_device, api_servers=a.api_servers,
        mixed_precision=a.mixed_precision or "no",
        endpoints=tuple(e.strip() for e in a.endpoints.split(",") if e.strip()),
        scorer=a.scorer, scorer_model=a.model, inspector=a.inspector, generator=a.generator,
        steps=a.steps, guidance=a.guidance, batch_size=a.batch_size,
        batch_timeout=a.batch_timeout, forward_batch=a.forward_batch,
        max_body_bytes=int(a.max_body_mb * 2**20), max_pixels=a.max_pixels,
        max_images=a.max_images, max_attempts=a.max_attempts, timeout=a.timeout, db_url=a.db,
        outputs=a.outputs, review_roots=tuple(a.review_root or ()), log_level=a.log_level,
        threads=a.threads,
    )  # fmt: skip
    if "score" in config.endpoints:
        from rewardkit.models.scorers import available_scorers

        if a.scorer not in available_scorers():
            raise ValueError(
                f"--scorer {a.scorer}: unknown; available: {', '.join(available_scorers())}"
            )
    run_server(config)
    return 0


def _labels_export(a: argparse.Namespace) -> int:
    from rewardkit.serve.labels import export_labels

    summary = export_labels(
        a.db, a.out, manifests=a.manifest, reviewers=a.reviewer, min_reviewers=a.min_reviewers
    )
    print(to_strict_json(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under accelerate launch / torchrun every process runs the command; the main
        # process alone prints the JSON summary (stderr, for errors and progress, stays).
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    handlers = {
        ("world", "render"): _world_render,
        ("world", "label"): _world_label,
        ("world", "community"): _world_community,
        ("score", None): _score,
        ("curate", None): _curate,
        ("train", "reward"): _train,
        ("train", "contrastive"): _pretrain,
        ("eval", "reward"): _eval,
        ("train", "rfnet"): _train_rfnet,
        ("train", "generator"): _train_generator,
        ("finetune", None): _finetune,
        ("generate", None): _generate,
        ("eval", "rfnet"): _eval_rfnet,
        ("eval", "generator"): _eval_generator,
        ("inspect", None): _inspect,
        ("demo", None): _demo,
        ("serve", None): _serve,
        ("labels", "export"): _labels_export,
    }
    key = (a.command, getattr(a, f"{a.command}_command", None))
    try:
        if hasattr(a, "device") and a.device is None:
            from rewardkit.commands.devices import default_device

            a.device = default_device()
        _check_device(a)
        _check_out(a, key)
        return handlers[key](a)
    except KeyboardInterrupt:
        print("rewardkit: interrupted; the same command resumes", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # User errors (bad input, missing or unwritable files): one line, never a traceback.
        print(f"rewardkit: error: {_one_line(e)}", file=sys.stderr)
        return 2


# What each command writes at --out: a file with one of these extensions, or a folder (None).
OUT_SUFFIXES: dict[tuple[str, str | None], tuple[str, ...] | None] = {
    ("score", None): (".parquet",),
    ("inspect", None): (".parquet",),
    ("curate", None): (".parquet",),
    ("world", "label"): (".parquet",),
    ("eval", "reward"): (".json",),
    ("eval", "rfnet"): (".json",),
    ("labels", "export"): (".parquet",),
}


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(text.split())


def _check_out(a: argparse.Namespace, key: tuple[str, str | None]) -> None:
    """Refuse an --out that cannot be written before any work starts: a folder where a file
    is written (or the reverse), an extension the command does not write, a place without
    write permission."""
    import os
    from pathlib import Path

    out = getattr(a, "out", None)
    if out is None:
        return
    path = Path(out)
    suffixes = OUT_SUFFIXES.get(key, None)
    if suffixes is not None:
        spark_folder = key == ("curate", None) and getattr(a, "engine", None) == "spark"
        if path.is_dir() and not spark_folder:  # Spark writes its pairs as a folder
            raise ValueError(f"--out {out}: is a folder; this command writes one file")
        if path.suffix.lower() not in suffixes:
            raise ValueError(
                f"--out {out}: this command writes {' or '.join(suffixes)}; "
                f"name the file with that extension"
            )
    elif path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: is a file; this command writes a folder")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {out}: cannot write in {parent}")


def _check_device(a: argparse.Namespace) -> None:
    """A --device that this machine cannot use is a one-line error before any work."""
    device = getattr(a, "device", None)
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device (cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
