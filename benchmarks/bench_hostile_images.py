"""Every command on hostile image files: exit status, skips named, peak memory. Prints JSON.

    python benchmarks/bench_hostile_images.py [--steps 2] [--target-gib 1.5]

Builds the corpus of ``tests/hostile.py`` in a temp folder (zero-byte, truncated and
text-named PNGs, a 20000 x 20000 PNG bomb, a 12000 x 12000 PNG, 16-bit greyscale, CMYK,
palette, EXIF-rotated, TIFF/BMP/GIF, a broken link, a unicode name, a hidden file, a text
file, and AdWorld product photos), plus the two loads issue 21 measured (32 copies of a
3000 x 2000 JPEG at batch 32; two 12000 x 12000 PNGs at batch 1). Runs ``score``,
``inspect``, ``generate --limit`` and ``world label`` on them, each as a fresh subprocess
(``python -m rewardkit.cli``), and reports per run: the exit status, the peak resident set
size (``os.wait4``, that child alone), the seconds, how many files were processed, whether
every bad file was named with its reason, and whether the peak stayed under the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the corpus lives in tests/
from tests.hostile import BIG_SIDE, build_hostile_corpus, write_label_manifest  # noqa: E402


def run(argv: list[str], workdir: Path) -> dict:
    """Run ``rewardkit <argv>`` in a fresh process; its exit status, time, peak RSS, output."""
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with out.open("wb") as o, err.open("wb") as e:
        child = subprocess.Popen([sys.executable, "-m", "rewardkit.cli", *argv], stdout=o,
                                 stderr=e, env=env)  # fmt: skip
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
    return {
        "exit": child.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # Linux: kB
        "stdout": out.read_text(),
        "stderr": err.read_text(),
    }


def named(bad: dict[str, str], reasons: dict[str, str]) -> bool:
    """Whether every bad file is in ``reasons`` (name -> message) with its expected reason."""
    return all(name in reasons and fragment in reasons[name] for name, fragment in bad.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps for generate")
    ap.add_argument("--target-gib", type=float, default=1.5)
    a = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        corpus = build_hostile_corpus(root / "corpus", big=True)
        manifest = write_label_manifest(corpus, root / "corpus" / "label.parquet")
        jpegs = root / "jpegs"  # 32 copies of a 3000 x 2000 photo-like JPEG
        jpegs.mkdir()
        rng = np.random.default_rng(0)
        coarse = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
        coarse.resize((3000, 2000), Image.Resampling.BICUBIC).save(jpegs / "0.jpg", quality=90)
        for i in range(1, 32):
            shutil.copyfile(jpegs / "0.jpg", jpegs / f"{i}.jpg")
        pngs = root / "pngs"  # two 12000 x 12000 PNGs
        pngs.mkdir()
        for i in range(2):
            shutil.copyfile(corpus.folder / f"big_{BIG_SIDE}.png", pngs / f"{i}.png")
        build_seconds = round(time.perf_counter() - start, 1)

        def score(folder: Path, name: str, batch: int) -> dict:
            out = root / f"{name}.parquet"
            r = run(["score", "--input", str(folder), "--out", str(out), "--batch-size",
                     str(batch), "--no-progress"], root)  # fmt: skip
            if r["exit"] == 0:
                r["processed"] = pq.read_table(out).num_rows
                report = json.loads(out.with_name(f"{name}.skipped.json").read_text())
                r["skipped"] = {s["path"]: s["reason"] for s in report["skipped"]}
            return r

        results["score"] = score(corpus.folder, "scores", 32)
        results["score_32_jpegs_3000x2000_batch32"] = score(jpegs, "jpegs", 32)
        results["score_2_pngs_12000x12000_batch1"] = score(pngs, "pngs", 1)

        verdicts = root / "verdicts.parquet"
        r = run(["inspect", "--input", str(corpus.folder), "--product", str(corpus.product),
                 "--caption", "a mug, 20 cm", "--out", str(verdicts)], root)  # fmt: skip
        if r["exit"] == 0:
            r["processed"] = pq.read_table(verdicts).num_rows
            report = json.loads(verdicts.with_name("verdicts.skipped.json").read_text())
            r["skipped"] = {Path(s["path"]).name: s["reason"] for s in report}
        results["inspect"] = r

        gen = root / "gen"
        r = run(["generate", "--products", str(corpus.folder), "--out", str(gen), "--limit",
                 "50", "--prompt", "a product on a wooden table", "--steps", str(a.steps),
                 "--no-progress"], root)  # fmt: skip
        if r["exit"] == 0:
            stats = json.loads(r["stdout"])
            r["processed"] = stats["products"]
            r["skipped"] = {Path(s["path"]).name: s["reason"] for s in stats["skipped"]}
        results["generate"] = r

        labels = root / "oracle.parquet"
        r = run(["world", "label", "--manifest", str(manifest), "--out", str(labels)], root)
        if r["exit"] == 0:
            rows = pq.read_table(labels).to_pylist()[: len(corpus.good) + len(corpus.bad)]
            r["processed"] = sum(row["oracle_label"] is not None for row in rows)
            r["skipped"] = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
        results["world_label"] = r

    target_mib = a.target_gib * 1024
    bad = dict(corpus.bad)
    report = {}
    for name, r in results.items():
        entry = {k: r[k] for k in ("exit", "seconds", "peak_rss_mib")}
        entry["under_target"] = r["peak_rss_mib"] < target_mib
        entry["processed"] = r.get("processed")
        if name in ("score", "inspect", "generate", "world_label"):
            expected = dict(bad)
            if name == "world_label":  # a manifest may name a hidden file, and it is read
                expected.pop(".hidden.png")
                expected["notes.txt"] = "not an image file"
            entry["good_files"] = len(corpus.good)
            entry["bad_files_named_with_reason"] = named(expected, r.get("skipped", {}))
        entry["domain_warning"] = "DomainWarning" in r["stderr"]
        if r["exit"] != 0:
            entry["stderr_tail"] = r["stderr"][-2000:]
        report[name] = entry
    print(json.dumps({
        "benchmark": "hostile_images",
        "target_peak_rss_gib": a.target_gib,
        "corpus": {"good": corpus.good, "bad": bad, "build_seconds": build_seconds},
        "cpu_count": os.cpu_count(),
        "runs": report,
        "all_under_target": all(e["under_target"] for e in report.values()),
    }, indent=2, ensure_ascii=False))  # fmt: skip


if __name__ == "__main__":
    main()
