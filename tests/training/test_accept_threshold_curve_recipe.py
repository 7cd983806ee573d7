import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.recipes import load_recipe

curve = load_recipe("accept_threshold_curve")
COLS = ["p_available", "p_space_mismatch", "p_size_mismatch", "p_indistinctiveness",
        "p_shape_hallucination", "p_unsuitable"]  # fmt: skip


def _write(tmp_path, p_available, labels, name="a"):
    n = len(labels)
    paths = [f"{name}{i}.png" for i in range(n)]
    cols = {"path": paths, "p_available": p_available}
    for c in COLS[1:]:
        cols[c] = [(1 - p) / 5 + (0.01 if c == "p_size_mismatch" else 0) for p in p_available]
    pq.write_table(pa.table(cols), tmp_path / f"V{name}.parquet")
    pq.write_table(
        pa.table({"path": paths[::-1], "label": labels[::-1]}), tmp_path / f"T{name}.parquet"
    )
    return f"{name}={tmp_path}/V{name}.parquet:{tmp_path}/T{name}.parquet"


def test_the_curve_counts_verdicts_at_each_threshold_and_pools_the_sets(tmp_path):
    a = _write(
        tmp_path, [0.9, 0.6, 0.4, 0.2], ["Available", "Available", "Size Mismatch", "Available"]
    )
    b = _write(tmp_path, [0.7, 0.3], ["Space Mismatch", "Size Mismatch"], name="b")
    out = curve.main(["--set", a, "--set", b, "--thresholds", "0.5:0.5:0.1", "--extra", "0.35",
                      "--out", str(tmp_path / "c.json")])  # fmt: skip
    at = {r["threshold"]: r for r in out["rows"]}
    # at 0.5: a's verdicts Available, Available, Size, Size -> 3 of 4 right; P 2/2, R 2/3
    assert at[0.5]["a"] == {"n": 4, "six_class": 0.75, "precision": 1.0, "recall": 2 / 3}
    # b at 0.5: Available (wrong), Size (right); pooled 4 of 6, P 2/3
    assert at[0.5]["pooled"]["six_class"] == pytest.approx(4 / 6)
    assert at[0.5]["pooled"]["precision"] == pytest.approx(2 / 3)
    # at 0.35 a's third image turns Available (wrong)
    assert at[0.35]["a"]["six_class"] == 0.5
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == out["rows"]


def test_a_verdict_without_a_label_names_the_file(tmp_path):
    a = _write(tmp_path, [0.9, 0.1], ["Available", "Unsuitable"])
    pq.write_table(pa.table({"path": ["a0.png"], "label": ["Available"]}), tmp_path / "Ta.parquet")
    with pytest.raises(SystemExit, match=r"Va\.parquet: 1 verdict path\(s\) not in .*Ta\.parquet"):
        curve.main(["--set", a, "--out", str(tmp_path / "c.json")])
