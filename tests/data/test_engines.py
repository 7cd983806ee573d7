"""Curation on Spark: the same rules (one SQL source, transpiled) give the same pairs, splits
and card as DuckDB, on local[2] and on a standalone master with a worker started here, and
through spark-submit of the same entry point."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from rewardkit.data.curation import CurationConfig, CurationResult, curate, read_pairs
from rewardkit.data.engines import to_spark_sql
from rewardkit.training.loop import read_table
from rewardkit.world.community_io import write_community
from tests.data.small_community import small_community

BIN = Path(sys.executable).parent
KEYS = ["prompt_id", "pos_image_id", "neg_image_id"]
# What a card holds that is not a count of the data: where and how long.
NOT_COUNTS = ("seconds", "out", "engine")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return write_community(small_community(), tmp_path_factory.mktemp("community"))


@pytest.fixture(scope="module")
def duck(log, tmp_path_factory):
    return curate(log, CurationConfig(), tmp_path_factory.mktemp("duck") / "pairs.parquet")


def _rows(table, out: Path) -> list[dict]:
    """Rows in key order, image paths resolved from the output's folder (each output names
    them relative to its own folder)."""
    rows = table.sort_by([(k, "ascending") for k in KEYS]).to_pylist()
    for r in rows:
        for col in ("pos_path", "neg_path"):
            r[col] = str((out.parent / r[col]).resolve())
    return rows


def _same(a, b) -> None:
    """The same pairs (every column, splits included) and the same card counts."""
    assert b.card["pairs_after_caps"] == a.card["pairs_after_caps"] > 100
    rows = _rows(b.pairs, b.out)
    assert rows == _rows(a.pairs, a.out)
    strip = lambda card: {k: v for k, v in card.items() if k not in NOT_COUNTS}  # noqa: E731
    assert strip(b.card) == strip(a.card)


def test_the_spark_translation_keeps_exact_percentiles():
    sql = to_spark_sql(
        "SELECT PERCENTILE_CONT(0.5) WITHIN GROUP (ORDER BY x) AS m FROM t GROUP BY g"
    )
    assert "PERCENTILE_CONT(0.5) WITHIN GROUP" in sql and "APPROX" not in sql.upper()


def test_spark_local_writes_the_pairs_duckdb_writes(log, duck, tmp_path):
    out = tmp_path / "pairs.parquet"
    spark = curate(log, CurationConfig(), out, engine="spark", spark_master="local[2]")
    _same(duck, spark)
    # A folder partitioned by split, without Spark's marker files; the recipes read it.
    assert out.is_dir() and {p.name for p in out.iterdir()} == {
        f"split={s}" for s, n in duck.card["pairs_per_split"].items() if n
    }
    assert not [p for p in out.rglob("*") if p.name.startswith((".", "_"))]
    table = read_table(out, ["prompt", "pos_path", "neg_path", "split"])
    assert table.num_rows == duck.pairs.num_rows and table["split"].type == "string"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_env() -> dict:
    """Spark's scripts find their home with whatever ``python3`` is on PATH (not this venv's
    under ``make test``): name it, and this interpreter for the Python side."""
    import pyspark

    return {**os.environ, "SPARK_HOME": str(Path(pyspark.__file__).parent),
            "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1"}  # fmt: skip


@pytest.fixture
def standalone(tmp_path):
    """A Spark standalone master and one worker (1 core) on loopback, stopped afterwards."""
    spark_class = BIN / "spark-class"
    port = _free_port()
    env = {**_spark_env(), "SPARK_LOG_DIR": str(tmp_path)}
    url = f"spark://127.0.0.1:{port}"
    logs = [open(tmp_path / f"{n}.log", "w") for n in ("master", "worker")]  # noqa: SIM115
    master = subprocess.Popen(
        [str(spark_class), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
         "--port", str(port), "--webui-port", str(_free_port())],
        env=env, stdout=logs[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = subprocess.Popen(
        [str(spark_class), "org.apache.spark.deploy.worker.Worker", url, "--cores", "1",
         "--memory", "1g", "--webui-port", str(_free_port()), "--work-dir",
         str(tmp_path / "work")],
        env=env, stdout=logs[1], stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.time() + 90
    while "Successfully registered with master" not in (tmp_path / "worker.log").read_text():
        if time.time() > deadline or worker.poll() is not None or master.poll() is not None:
            tail = (tmp_path / "worker.log").read_text()[-2000:]
            pytest.fail(f"standalone cluster did not start:\n{tail}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        for proc in (worker, master):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for f in logs:
            f.close()


def test_spark_standalone_and_spark_submit_write_the_same_pairs(log, duck, standalone, tmp_path):
    out = tmp_path / "cluster" / "pairs.parquet"
    argv = ["curate", "--events", str(log), "--out", str(out), "--engine", "spark",
            "--spark-master", standalone]  # fmt: skip
    assert main(argv) == 0
    card = json.loads(out.with_name("pairs.card.json").read_text())
    _same(duck, CurationResult(out, card))
    # spark-submit of the same entry point (the CLI module) on the same cluster.
    import rewardkit.cli

    submitted = tmp_path / "submit" / "pairs.parquet"
    done = subprocess.run(
        [str(BIN / "spark-submit"), "--master", standalone, rewardkit.cli.__file__, "curate",
         "--events", str(log), "--out", str(submitted), "--engine", "spark"],
        capture_output=True, text=True, timeout=600,
        env=_spark_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _rows(read_pairs(submitted), submitted) == _rows(duck.pairs, duck.out)


def test_spark_without_java_is_one_line_and_exit_2(log, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rc = main(["curate", "--events", str(log), "--out", str(tmp_path / "p.parquet"),
               "--engine", "spark"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "Java" in err[0] and "--engine duckdb" in err[0]
    assert not (tmp_path / "p.parquet").exists()


def test_spark_master_without_spark_engine_is_refused(log, tmp_path, capsys):
    rc = main(["curate", "--events", str(log), "--out", str(tmp_path / "p.parquet"),
               "--spark-master", "local[2]"])  # fmt: skip
    assert rc == 2 and "--spark-master" in capsys.readouterr().err


def test_duckdb_output_replaces_an_earlier_spark_folder(log, duck, tmp_path):
    out = tmp_path / "pairs.parquet"
    (out / "split=train").mkdir(parents=True)
    (out / "split=train" / "part-0.parquet").write_bytes(b"old")
    assert main(["curate", "--events", str(log), "--out", str(out)]) == 2  # a folder: refused
    shutil.rmtree(out)
    again = curate(log, CurationConfig(), out)
    assert out.is_file() and pq.read_table(out).num_rows == again.card["pairs_after_caps"]
