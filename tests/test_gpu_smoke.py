"""benchmarks/gpu_smoke.py runs end to end at tiny sizes on a CPU, so it is ready for a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
PARTS = ("score", "train_reward", "inspect", "train_rfnet", "inspect_aligned", "depth",
         "generate", "finetune")  # fmt: skip
DTYPES = ("fp32", "bf16")
NUMBERS = ("seconds_per_step", "images_per_s", "tflop_per_step", "flop_limit_ratio")


def _errors(report: object, where: str = "") -> list[str]:
    """Every ``error``/``unsupported``/``skipped`` entry anywhere in the report."""
    if isinstance(report, dict):
        found = [
            f"{where}.{k}: {report[k]}" for k in ("error", "unsupported", "skipped") if k in report
        ]
        for key, value in report.items():
            found += _errors(value, f"{where}.{key}")
        return found
    return []


def test_tiny_run_reports_every_part_and_dtype(tmp_path: Path) -> None:
    out = tmp_path / "gpu_smoke.json"
    cmd = [
        sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--dtypes", ",".join(DTYPES),
        "--repeats", "1", "--peak-tflops", "1", "--out", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = json.loads(res.stdout)
    written = json.loads(out.read_text())
    assert printed == written
    assert _errors(printed) == []
    assert set(printed["parts"]) == set(PARTS)
    for part in PARTS:
        result = printed["parts"][part]
        assert result["config"], part
        for dtype in DTYPES:
            row = result[dtype]
            for key in NUMBERS:
                value = row[key]
                assert isinstance(value, int | float) and math.isfinite(value), (part, dtype, key)
                assert value > 0, (part, dtype, key, value)
    for dtype in DTYPES:  # the channels-last step measured beside the default one
        row = printed["parts"]["train_rfnet"][dtype]["channels_last"]
        assert all(row[key] > 0 for key in NUMBERS), (dtype, row)
    gen = printed["parts"]["generate"]["fp32"]
    assert gen["seconds_per_image"] > 0


def test_unknown_part_is_refused() -> None:
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--parts", "scroe"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert "--parts" in res.stderr and "scroe" in res.stderr


def test_deadline_skips_parts_and_still_writes(tmp_path: Path) -> None:
    out = tmp_path / "gpu_smoke.json"
    cmd = [
        sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--parts", "score,finetune",
        "--deadline-s", "0", "--out", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"score", "finetune"}
    assert all("skipped" in result for result in parts.values())
