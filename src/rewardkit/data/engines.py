"""SQL engines for curation: one source of rules, run in DuckDB (embedded) or Spark SQL.

The curation stages are written once, in DuckDB's SQL (``data/sql/curation_*.sql``: CTEs,
window functions, integer hashes that fit in a BIGINT, times as float seconds). DuckDB runs
them as written; :class:`SparkEngine` runs SQLGlot's DuckDB -> Spark SQL translation of the
same text, with ``PERCENTILE_CONT/DISC ... WITHIN GROUP`` kept exact (SQLGlot's default Spark
output is the approximate percentile) and ANSI mode off (division by zero gives NULL, as in
DuckDB). Both engines read the canonical Parquet copies the log normaliser writes, so the
schema checks run in front of both.

An engine registers Parquet files as tables, materialises stages, returns small results as
Arrow tables (counts for the card) and writes the final pairs: DuckDB as one Parquet file,
Spark as a Parquet folder partitioned by ``split`` (``split=train/part-*.parquet``), which
``pyarrow.parquet.read_table`` and the training recipes read as one table.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "ENGINES",
    "DuckDBEngine",
    "EngineUnavailable",
    "SparkEngine",
    "check_java",
    "make_engine",
    "to_spark_sql",
]

ENGINES = ("duckdb", "spark")


class EngineUnavailable(ValueError):
    """An engine that cannot start here (no Java, no pyspark): one line saying what to do."""


class DuckDBEngine:
    """The embedded default: an in-memory DuckDB connection."""

    name = "duckdb"

    def __init__(self) -> None:
        import duckdb

        self.con = duckdb.connect(":memory:")

    def register(self, name: str, path: Path) -> None:
        quoted = "'" + str(path).replace("'", "''") + "'"
        self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({quoted})")

    def stage(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE TEMP TABLE {name} AS {sql}")

    def table(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()

    def write_parquet(self, sql: str, out: Path) -> None:
        """The query's rows as one Parquet file at ``out`` (written in place: the caller
        writes to a temporary name and renames)."""
        from rewardkit.io import write_parquet_atomic

        write_parquet_atomic(out, self.table(sql))

    def close(self) -> None:
        self.con.close()


def _spark_dialect():
    from sqlglot import exp
    from sqlglot.dialects.spark import Spark

    class ExactSpark(Spark):
        """Spark SQL that keeps exact percentiles (``PERCENTILE_CONT(q) WITHIN GROUP``)."""

        class Generator(Spark.Generator):
            TRANSFORMS = {
                k: v
                for k, v in Spark.Generator.TRANSFORMS.items()
                if k not in (exp.PercentileCont, exp.PercentileDisc, exp.WithinGroup)
            }

    return ExactSpark


def to_spark_sql(sql: str) -> str:
    """One DuckDB statement in Spark SQL (SQLGlot, exact percentiles)."""
    import sqlglot

    (out,) = sqlglot.transpile(sql, read="duckdb", write=_spark_dialect())
    return out


def check_java() -> str:
    """The ``java`` Spark will start, or a one-line error saying how to get one."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        raise EngineUnavailable(
            "--engine spark needs Java 17 or later (not found on PATH or in JAVA_HOME); "
            "install it (Debian: apt-get install openjdk-17-jre-headless) or use --engine duckdb"
        )
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EngineUnavailable(f"--engine spark: {java} -version failed ({err})") from None
    first = (done.stderr or done.stdout).strip().splitlines()[:1]
    return first[0] if first else java


class SparkEngine:
    """Spark SQL through a SparkSession: ``master`` (``local[2]``, ``spark://host:7077``...),
    or the one ``spark-submit`` configured when None."""

    name = "spark"

    def __init__(self, master: str | None = None, app_name: str = "rewardkit-curate") -> None:
        check_java()
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise EngineUnavailable(
                "--engine spark needs pyspark: pip install 'rewardkit[spark]'"
            ) from None
        # A session this engine starts is stopped by close(); a caller's own is left running.
        self._owned = SparkSession.getActiveSession() is None
        builder = SparkSession.builder.appName(app_name)
        if master is not None:
            builder = builder.master(master)
        elif not os.environ.get("SPARK_HOME") and "PYSPARK_GATEWAY_PORT" not in os.environ:
            builder = builder.master("local[*]")  # not under spark-submit: this machine
        self.spark = (
            builder.config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.ansi.enabled", "false")  # x / 0 -> NULL, as in DuckDB
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", os.environ.get("RK_SPARK_PARTITIONS", "8"))
            .getOrCreate()
        )
        self.spark.sparkContext.setLogLevel("ERROR")
        self._cached: list[Any] = []

    def register(self, name: str, path: Path) -> None:
        self.spark.read.parquet(str(path)).createOrReplaceTempView(name)

    def stage(self, name: str, sql: str) -> None:
        df = self.spark.sql(to_spark_sql(sql)).persist()
        df.count()  # materialise once: later stages read it, not its plan
        df.createOrReplaceTempView(name)
        self._cached.append(df)

    def table(self, sql: str) -> pa.Table:
        df = self.spark.sql(to_spark_sql(sql))
        try:
            return df.toArrow()
        except AttributeError:  # older pyspark
            return pa.Table.from_pandas(df.toPandas(), preserve_index=False)

    def write_parquet(self, sql: str, out: Path) -> None:
        """The query's rows as a Parquet folder at ``out``, partitioned by ``split``."""
        df = self.spark.sql(to_spark_sql(sql))
        df.write.mode("overwrite").partitionBy("split").parquet(str(out))

    def close(self) -> None:
        for df in self._cached:
            df.unpersist()
        for view in ("events", "images", "users"):
            self.spark.catalog.dropTempView(view)
        if self._owned:
            self.spark.stop()


def make_engine(name: str, spark_master: str | None = None):
    """The engine called ``name`` (``duckdb`` or ``spark``)."""
    if name == "duckdb":
        if spark_master is not None:
            raise ValueError("--spark-master is only used with --engine spark")
        return DuckDBEngine()
    if name == "spark":
        return SparkEngine(spark_master)
    raise ValueError(f"--engine: expected one of {', '.join(ENGINES)}; got {name!r}")
