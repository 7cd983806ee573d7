"""The ``rewardkit`` command line: thin parsing over library functions.

``main(argv)`` returns an exit code, so tests call it directly. Errors in the user's input
(bad parameters, missing files or columns) print one line naming what is wrong and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


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

    lab = wsub.add_parser("label", help="run the oracle over the images of a manifest")
    lab.add_argument("--manifest", required=True, help="Parquet with path, product_path, ...")
    lab.add_argument("--out", required=True, help="output Parquet, one row per image")

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

    d = sub.add_parser("demo", help="run the whole loop on the embedded default, write a report")
    d.add_argument("--out", required=True, help="output folder (report.html inside)")
    d.add_argument("--n", type=_positive(int), default=240, help="images to render and label")
    d.add_argument("--users", type=_positive(int), default=20000, help="community size")
    d.add_argument("--seed", type=int, default=0)
    return parser


def _world_render(a: argparse.Namespace) -> int:
    from rewardkit.world.export import render_world
    from rewardkit.world.placement import DEFAULT_FILL

    table = render_world(a.out, a.n, a.seed, a.size, a.balance, a.fill or DEFAULT_FILL)
    counts = {}
    for lab in table.column("label").to_pylist():
        counts[lab] = counts.get(lab, 0) + 1
    print(json.dumps({"out": a.out, "images": table.num_rows, "per_class": counts}))
    return 0


def _world_label(a: argparse.Namespace) -> int:
    from rewardkit.world.export import label_manifest

    table, errors = label_manifest(a.manifest, a.out)
    summary: dict = {"out": a.out, "labelled": table.num_rows - errors, "skipped": errors}
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
    print(json.dumps(summary))
    if errors:
        for e in table.column("error").to_pylist():
            if e:
                print(f"skipped: {e}", file=sys.stderr)
    return 0


def _world_community(a: argparse.Namespace) -> int:
    from rewardkit.world.simulate import community_summary, simulate_pool

    logs = simulate_pool(a.out, a.users, a.seed, a.prompts, a.images_per_prompt, a.size, a.events)
    summary = community_summary(logs, a.out)
    print(json.dumps(summary))
    return 0


def _demo(a: argparse.Namespace) -> int:
    from rewardkit.demo import run_demo

    path = run_demo(a.out, n=a.n, users=a.users, seed=a.seed)
    print(f"report: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    handlers = {
        ("world", "render"): _world_render,
        ("world", "label"): _world_label,
        ("world", "community"): _world_community,
        ("demo", None): _demo,
    }
    key = (a.command, getattr(a, "world_command", None))
    try:
        return handlers[key](a)
    except (ValueError, FileNotFoundError) as e:
        print(f"rewardkit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
