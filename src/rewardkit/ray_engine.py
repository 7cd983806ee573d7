"""``score``, ``inspect`` and ``generate`` on Ray: rows -> decoding tasks -> actors -> shards.

The three commands with ``--engine ray`` share one runner (:func:`run_shards`):

* the rows (images to score or inspect, products to generate for) are numbered in input
  order and cut into shards of ``shard_rows``;
* Ray Data decodes them in parallel tasks (``score`` and ``inspect``: the local path's readers;
  an unreadable item becomes a row with the reason, a counted skip as in the local path) and
  runs the model in a pool of actors (``map_batches`` with a callable class and
  ``ActorPoolStrategy(size=actors)``): each actor loads its models once, on its own GPU when
  ``gpus_per_actor`` > 0;
* the driver writes each shard as ``<out>.shards/shard-NNNNN.parquet`` (atomically, with the
  run's fingerprint) as soon as its last row arrives, and a re-run of the same command skips
  finished shards;
* at the end the shards are merged into the local path's outputs, in input order.

Each command's actor calls the local path's own per-batch function: ``scoring._score``
(score_batch and its checks), ``commands.inspect.inspect_batch`` (the inspector's forward)
and ``generation.recurrent.recurrent_generate`` (Recurrent Generation with batched refill on
the actor's products, seeded by their run indices, so a shard paints the images the whole
run paints).

Faults: a batch that raises inside an actor is run again one row at a time (rows that still
fail are skipped with the error) and counted (``batch_failures``); an actor that dies is
restarted by Ray and its batches retried (the actor pool's ``max_restarts`` and
``max_task_retries``), and its restart is counted (``actor_restarts``). The actors tell both
events to a small ledger actor as they happen, so an event still counts (once) when the
output that would have carried it dies with its actor and is made again. The driver keeps
the first result of each row (``duplicates_dropped`` counts the others), so every row is
processed exactly once. ``RK_RAY_FAULTS`` (a folder) injects one raising batch and one actor
exit per run, for the tests.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rewardkit.io import write_json_atomic, write_parquet_atomic

__all__ = [
    "RayScoreSummary",
    "ShardActor",
    "ShardRun",
    "generate_ray",
    "inspect_images_ray",
    "run_shards",
    "score_images_ray",
]

SHARD_ROWS = 4096  # score and inspect: images per shard
GENERATE_SHARD_BATCHES = 4  # generate: a shard holds this many generator batches of products
FINGERPRINT_KEY = b"rewardkit_ray_shard"
# Per output row, not written: which actor call made it, that call's seconds and its input's
# decoding seconds (on its first row, 0 on the others).
_CONTROL = ("_batch", "_seconds", "_decode_seconds")


# ---------------------------------------------------------------------------------------
# The runner: rows -> decoding tasks -> actor pool -> shards.


@dataclass
class ShardRun:
    """What :func:`run_shards` did; ``table()`` reads the finished shards back."""

    shard_dir: Path
    shards: int
    shards_resumed: int
    shard_rows: int
    actors: int
    seconds: float
    batch_failures: int = 0  # batches that raised in an actor and were run row by row
    actor_restarts: int = 0  # actors Ray restarted after they died
    duplicates_dropped: int = 0  # results of rows already kept (a retried batch)
    actor_seconds: float = 0.0  # time the actors spent on the kept results, all together
    decode_seconds: float = 0.0  # time the decoding tasks spent on them, all together

    def shard_file(self, k: int) -> Path:
        return self.shard_dir / f"shard-{k:05d}.parquet"

    def table(self) -> pa.Table | None:
        """Every shard's rows, in row order (a row's several output rows in their order);
        None when the run had no rows."""
        if not self.shards:
            return None
        return pa.concat_tables([pq.read_table(self.shard_file(k)) for k in range(self.shards)])

    def info(self) -> dict:
        """The run's Ray figures, for a command's JSON summary."""
        return {
            "engine": "ray", "actors": self.actors, "shards": self.shards,
            "shards_resumed": self.shards_resumed, "batch_failures": self.batch_failures,
            "actor_restarts": self.actor_restarts, "duplicates_dropped": self.duplicates_dropped,
            "actor_seconds": round(self.actor_seconds, 2),
            "decode_seconds": round(self.decode_seconds, 2),
        }  # fmt: skip


class ShardActor(abc.ABC):
    """Ray actor body shared by the commands: a subclass loads its models once in
    ``__init__`` and implements :meth:`process`; this class runs it on each batch, absorbs a
    raising batch (row by row), tells the run's ledger of failures and of its own restart,
    and fills the rows that cannot be processed.

    Input batches hold ``row`` (run index) and ``error`` ("" or why the row cannot be
    processed, e.g. an unreadable file), plus the command's columns. ``fill`` names each
    output column of :meth:`process` (besides ``row``) with its dtype and the value given to
    rows that carry an error."""

    what = "processing"
    fill: dict[str, tuple[object, object]] = {}

    def __init__(self, faults: str | None = None, ledger=None) -> None:
        import uuid

        import ray

        self.faults, self.ledger = faults, ledger
        self.batches = 0
        self.uid = uuid.uuid4().hex[:12]  # a restarted actor is a new uid
        if getattr(ray.get_runtime_context(), "was_current_actor_reconstructed", False):
            self._note("actor_restarts", self.uid)

    def _note(self, kind: str, key: str) -> None:
        """Count an event in the run's ledger (before going on: a batch whose output dies
        with its actor and is run again still counts once)."""
        if self.ledger is not None:
            import ray

            ray.get(self.ledger.add.remote(kind, key))

    @abc.abstractmethod
    def process(self, batch: dict) -> dict:
        """Outputs for rows without an error: ``row`` and the ``fill`` columns (one or more
        output rows per input row, a row's outputs together)."""

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        self.batches += 1
        _maybe_exit(self.faults, self.batches)
        errors = np.array([str(e) if e else "" for e in batch["error"]], dtype=object)
        ok = errors == ""
        parts = []
        rows = batch["row"]
        if ok.any():
            try:
                _maybe_raise(self.faults, self.batches)
                parts.append(self.process(_take(batch, np.flatnonzero(ok))))
            except Exception:  # noqa: BLE001 (a model error must not lose the batch)
                self._note("batch_failures", f"{rows[0]}+{len(rows)}")  # once if retried
                parts = []
                for i in np.flatnonzero(ok):
                    try:
                        parts.append(self.process(_take(batch, np.array([i]))))
                    except Exception as err:  # noqa: BLE001
                        errors[i] = f"{self.what} failed: {type(err).__name__}: {err}"
                        ok[i] = False
        for p in parts:
            p["error"] = np.full(len(p["row"]), "", dtype=object)
        if not ok.all():
            bad = ~ok
            m = int(bad.sum())
            blank = {c: np.full(m, v, dtype=dt) for c, (dt, v) in self.fill.items()}
            parts.append({"row": rows[bad], "error": errors[bad], **blank})
        out = {c: np.concatenate([p[c] for p in parts]) for c in ("row", "error", *self.fill)}
        m = len(out["row"])
        out["_batch"] = np.full(m, f"{self.uid}:{self.batches}", dtype=object)
        out["_seconds"] = np.zeros(m, np.float64)
        out["_seconds"][0] = time.perf_counter() - start
        out["_decode_seconds"] = np.zeros(m, np.float64)
        if "_decode_seconds" in batch:
            out["_decode_seconds"][0] = float(np.sum(batch["_decode_seconds"]))
        return out


class _Timed:
    """A decoding task body that also reports its seconds (``_decode_seconds``, on the
    batch's first row)."""

    def __init__(self, decode) -> None:
        self.decode = decode

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        out = self.decode(batch)
        seconds = np.zeros(len(out["row"]), np.float64)
        seconds[0] = time.perf_counter() - start
        out["_decode_seconds"] = seconds
        return out


def _take(batch: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in batch.items()}


def _fault_marker(folder: str | None, kind: str) -> bool:
    """True once per run (the marker file is created exclusively) when faults are injected."""
    if not folder:
        return False
    try:
        fd = os.open(Path(folder) / kind, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _maybe_raise(folder: str | None, batches: int) -> None:
    if batches == 1 and _fault_marker(folder, "raised"):
        raise RuntimeError("injected fault: this batch raises (RK_RAY_FAULTS)")


def _maybe_exit(folder: str | None, batches: int) -> None:
    if batches == 2 and _fault_marker(folder, "exited"):
        os._exit(1)  # the actor dies mid-run (RK_RAY_FAULTS)


_LEDGER = None


def _ledger():
    """A small actor that counts the run's fault events by key (batch failures, actor
    restarts), told by the actors as they happen."""
    global _LEDGER
    if _LEDGER is None:
        import ray

        @ray.remote(num_cpus=0)
        class Ledger:
            def __init__(self) -> None:
                self.events: dict[str, set[str]] = {}

            def add(self, kind: str, key: str) -> None:
                self.events.setdefault(kind, set()).add(key)

            def counts(self) -> dict[str, int]:
                return {k: len(v) for k, v in self.events.items()}

        _LEDGER = Ledger
    return _LEDGER.remote()


def _finished(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return meta.get(FINGERPRINT_KEY) == fingerprint.encode()


def run_shards(
    source: pa.Table,
    shard_dir: Path,
    fingerprint: str,
    actor: type[ShardActor],
    actor_kwargs: dict,
    *,
    batch_size: int,
    shard_rows: int,
    actors: int,
    gpus_per_actor: float = 0.0,
    address: str | None = None,
    decode=None,
    progress: bool = True,
    desc: str = "ray",
    unit: str = "row",
) -> ShardRun:
    """Process every row of ``source`` (one per input item, in input order; a ``row`` column
    with the run index is added) into shards under ``shard_dir`` (module docstring).

    ``decode`` (a callable on numpy batches, run in Ray tasks) turns a batch of rows into the
    actor's input; without it the rows go to the actors as they are (with ``error`` ""
    added when ``source`` has none). The actors (``actor(**actor_kwargs)``) take batches of
    ``batch_size`` rows. Shards whose file carries ``fingerprint`` are not run again."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    start = time.perf_counter()
    if actors < 1 or batch_size < 1 or shard_rows < 1:
        raise ValueError(
            "--actors, --batch-size and the shard size must be >= 1; got "
            f"{actors}, {batch_size}, {shard_rows}"
        )
    if not gpus_per_actor >= 0:
        raise ValueError(f"--gpus-per-actor must be >= 0; got {gpus_per_actor}")
    n = source.num_rows
    source = source.append_column("row", pa.array(np.arange(n, dtype=np.int64)))
    if "error" not in source.column_names:
        source = source.append_column("error", pa.array([""] * n, pa.string()))
    n_shards = math.ceil(n / shard_rows)
    shard_dir.mkdir(parents=True, exist_ok=True)
    run = ShardRun(shard_dir, n_shards, 0, shard_rows, actors, 0.0)
    done = {k for k in range(n_shards) if _finished(run.shard_file(k), fingerprint)}
    run.shards_resumed = len(done)
    pending = [i for i in range(n) if i // shard_rows not in done]
    if pending:
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        ctx = DataContext.get_current()
        bars = ctx.enable_progress_bars
        ctx.enable_progress_bars = progress
        try:
            ds = ray.data.from_arrow(source.take(pa.array(pending, pa.int64())))
            ds = ds.repartition(max(1, math.ceil(len(pending) / batch_size)))
            if decode is not None:
                # Tasks, so decoding scales with the cluster's CPUs: a CPU each, unlike the
                # actors' half, else Ray Data fuses them into the actors (equal remote args).
                ds = ds.map_batches(
                    _Timed(decode), batch_size=batch_size, batch_format="numpy", num_cpus=1
                )
            ledger = _ledger()
            kwargs = {**actor_kwargs, "faults": os.environ.get("RK_RAY_FAULTS") or None,
                      "ledger": ledger}  # fmt: skip
            # Ray Data's actor pools restart a dead actor and retry its batch without end
            # (max_restarts = max_task_retries = -1 are its defaults for them).
            ds = ds.map_batches(
                actor, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                batch_format="numpy", compute=ActorPoolStrategy(size=actors),
                num_gpus=gpus_per_actor, num_cpus=0.5,
            )  # fmt: skip
            _collect(ds, pending, run, fingerprint, progress, desc, unit)
            counts = ray.get(ledger.counts.remote())
            run.batch_failures = counts.get("batch_failures", 0)
            run.actor_restarts = counts.get("actor_restarts", 0)
            ray.kill(ledger)
        finally:
            ctx.enable_progress_bars = bars
            if started_here:
                ray.shutdown()
    run.seconds = time.perf_counter() - start
    return run


def _collect(ds, pending, run: ShardRun, fingerprint, progress, desc, unit) -> None:
    """Keep each row's first result; write a shard as soon as all its rows are in."""
    from tqdm import tqdm

    expected: dict[int, int] = {}
    for i in pending:
        expected[i // run.shard_rows] = expected.get(i // run.shard_rows, 0) + 1
    owner: dict[int, str] = {}  # row -> the batch whose result is kept
    parts: dict[int, list[pa.Table]] = {k: [] for k in expected}
    seen: dict[int, set[int]] = {k: set() for k in expected}
    duplicates = set()
    bar = tqdm(total=len(pending), desc=desc, disable=not progress, unit=unit)
    for t in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows = t["row"].to_numpy()
        batch = t["_batch"].to_pylist()
        keep = np.zeros(len(rows), dtype=bool)
        for j, (r, b) in enumerate(zip(rows.tolist(), batch, strict=True)):
            if owner.setdefault(r, b) == b:
                keep[j] = True
            else:
                duplicates.add((r, b))
        run.actor_seconds += float(np.sum(t["_seconds"].to_numpy()[keep]))
        run.decode_seconds += float(np.sum(t["_decode_seconds"].to_numpy()[keep]))
        body = t.drop_columns(list(_CONTROL))
        shard = rows // run.shard_rows
        for k in np.unique(shard[keep]).tolist():
            sel = np.flatnonzero(keep & (shard == k))
            parts[k].append(body.take(pa.array(sel)))
            fresh = set(rows[sel].tolist()) - seen[k]
            seen[k] |= fresh
            bar.update(len(fresh))
            # Written when its last row is in (again if Ray split a batch's outputs over
            # blocks and the rest of a row's outputs comes later).
            if len(seen[k]) == expected[k]:
                whole = pa.concat_tables(parts[k])
                order = np.argsort(whole["row"].to_numpy(), kind="stable")
                whole = whole.take(pa.array(order)).replace_schema_metadata(
                    {FINGERPRINT_KEY: fingerprint.encode()}
                )
                write_parquet_atomic(run.shard_file(k), whole)
    bar.close()
    run.duplicates_dropped = len(duplicates)
    missing = {k: expected[k] - len(seen[k]) for k in expected if len(seen[k]) != expected[k]}
    if missing:
        raise RuntimeError(
            f"Ray returned no result for some rows of shard(s) {missing}; re-run to finish them"
        )


def _model_digest(model: str | Path | None) -> str:
    """Names, sizes and times of a model folder's files (the driver does not load it)."""
    h = hashlib.sha256()
    if model is not None and Path(model).exists():
        root = Path(model)
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{st.st_size}:"
                         f"{st.st_mtime_ns};".encode())  # fmt: skip
    return h.hexdigest()


def _fingerprint(*parts: object, rows: list[tuple] = ()) -> str:
    h = hashlib.sha256("\0".join(str(p) for p in parts).encode())
    for r in rows:
        h.update(("\0".join(str(v) for v in r) + "\1").encode())
    return h.hexdigest()


def _shard_dir(out: Path) -> Path:
    """``<out stem>.shards`` beside a file output, ``<out name>.shards`` beside a folder."""
    return out.with_name((out.name if out.suffix == "" else out.stem) + ".shards")


# ---------------------------------------------------------------------------------------
# score --engine ray


@dataclass
class RayScoreSummary:
    out: Path
    scored: int
    skipped: list[dict]
    seconds: float
    run: ShardRun  # the runner's shards, fault counts and time in actors and decoders
    skipped_report: Path | None = None
    counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out), "scored": self.scored, "skipped": len(self.skipped),
            "seconds": self.seconds, **self.run.info(),
            "skipped_report": str(self.skipped_report), "counts": self.counts,
        }  # fmt: skip


class _Decode:
    """Ray task body: a batch of rows -> their pixels (float, 3 x side x side, in [0, 1]) at
    the scorer's side, or the reason a row cannot be read."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, batch: dict) -> dict:
        import torch

        from rewardkit.io import decode_image
        from rewardkit.models.social_reward import images_to_pixel_values
        from rewardkit.scoring import scorer_input

        pixels, errors = [], []
        zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        blank = np.zeros((3, self.side, self.side), np.float32)
        for path in batch["file"]:
            try:
                if not path:
                    raise ValueError("empty path")
                decoded = decode_image(path, "RGB", target_side=self.side)
            except (OSError, ValueError) as err:
                pixels.append(blank)
                errors.append(str(err).removeprefix(f"{path}: ") or type(err).__name__)
                continue
            # As the local path: a full-size decode is resized in float (the scorer's own
            # resize), a reduced one gets the scorer's crop from the reduced pixels.
            if decoded.reduction == 1:
                x = torch.from_numpy(decoded.array.copy()).permute(2, 0, 1)[None].float() / 255
                x = images_to_pixel_values(x, self.side, zero, one)[0]
            else:
                x = torch.from_numpy(scorer_input(decoded, self.side)).permute(2, 0, 1) / 255.0
            pixels.append(x.float().numpy())
            errors.append("")
        return {"row": batch["row"], "prompt": batch["prompt"], "pixels": np.stack(pixels),
                "error": np.array(errors, dtype=object)}  # fmt: skip


class _Score(ShardActor):
    """Loads the scorer once; a batch of decoded rows -> scores."""

    what = "scoring"
    fill = {"score": (np.float64, np.nan)}

    def __init__(
        self, name: str, model: str | None, device: str, mixed_precision: str,
        faults: str | None = None, ledger=None,
    ) -> None:  # fmt: skip
        super().__init__(faults, ledger)
        from rewardkit.models.scorers import create_scorer

        self.scorer = create_scorer(name, model, device=device)
        self.device, self.mixed_precision = device, mixed_precision

    def process(self, batch: dict) -> dict:
        import torch

        from rewardkit.commands.devices import autocast
        from rewardkit.scoring import _score  # the local path's call (score_batch, checks)

        prompts = [str(p) for p in batch["prompt"]]
        x = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32))
        with autocast(self.device, self.mixed_precision):
            scores = _score(self.scorer, x, prompts, len(prompts)).numpy()
        return {"row": batch["row"], "score": scores.astype(np.float64)}


def score_images_ray(
    scorer_name: str,
    model: str | Path | None,
    input: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = 32,
    prompt: str = "",
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    device: str = "cpu",
    mixed_precision: str = "no",
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
) -> RayScoreSummary:
    """Score a folder or manifest on Ray (module docstring); the output is the local
    ``score``'s: ``out`` (Parquet, input order) and ``<out stem>.skipped.json``."""
    from rewardkit.models.scorers import available_scorers
    from rewardkit.scoring import _output_table, _read_input

    start = time.perf_counter()
    if scorer_name not in available_scorers():
        raise ValueError(
            f"unknown scorer {scorer_name!r}; available: {', '.join(available_scorers())}"
        )
    out = Path(out)
    rows, files, unlisted = _read_input(Path(input), prompt)
    paths = rows.column("path").to_pylist()
    prompts = rows.column("prompt").to_pylist()
    device = "cuda" if gpus_per_actor > 0 else "cpu"  # the actors' device, not the driver's
    fingerprint = _fingerprint(
        "score", Path(input).resolve(), scorer_name, _model_digest(model), shard_rows, device,
        mixed_precision, rows=list(zip(paths, prompts, strict=True)),
    )  # fmt: skip
    source = pa.table({
        "file": pa.array([str(f) if f is not None else "" for f in files], pa.string()),
        "prompt": pa.array([str(p) for p in prompts], pa.string()),
    })  # fmt: skip
    side = _scorer_side(scorer_name, model)
    run = run_shards(
        source, _shard_dir(out), fingerprint, _Score,
        {"name": scorer_name, "model": str(model) if model else None, "device": device,
         "mixed_precision": mixed_precision},
        batch_size=batch_size, shard_rows=shard_rows, actors=actors,
        gpus_per_actor=gpus_per_actor, address=address, decode=_Decode(side),
        progress=progress, desc="score (ray)", unit="img",
    )  # fmt: skip
    # Merge the shards: the local path's table and skip report.
    t = run.table()
    scores: dict[int, float] = {}
    skipped: dict[int, str] = {}
    columns = [t[c].to_pylist() for c in ("row", "score", "error")] if t else [[], [], []]
    for r, s, e in zip(*columns, strict=True):
        if e:
            skipped[r] = e
        else:
            scores[r] = s
    order = sorted(scores)
    table = _output_table(rows, order, [scores[i] for i in order])
    write_parquet_atomic(out, table)
    skipped_list = [{"path": paths[i] or "", "reason": skipped[i]} for i in sorted(skipped)]
    if unlisted:
        listed = [{"path": s.path, "reason": s.reason} for s in unlisted]
        skipped_list = sorted([*listed, *skipped_list],
                              key=lambda s: s["path"])  # fmt: skip
    report = out.with_name(out.stem + ".skipped.json")
    write_json_atomic(report, {"input": str(input), "out": str(out), "skipped": skipped_list})
    return RayScoreSummary(
        out=out, scored=table.num_rows, skipped=skipped_list,
        seconds=time.perf_counter() - start, run=run, skipped_report=report,
        counts={"rows": len(paths)},
    )  # fmt: skip


def _scorer_side(name: str, model: str | Path | None) -> int:
    """The scorer's square input side, from its folder's config (the driver loads no
    weights); 224 when the folder does not say."""
    from rewardkit.models.defaults import default_model_path

    folder = Path(model) if model is not None else default_model_path(name)
    for cfg in (folder / "config.json", folder / "preprocessor_config.json"):
        if cfg.is_file():
            raw = json.loads(cfg.read_text())
            for key in ("image_size",):
                v = raw.get("vision_config", {}).get(key, raw.get(key))
                if isinstance(v, int):
                    return v
    return 224


# ---------------------------------------------------------------------------------------
# inspect --engine ray


class _InspectDecode:
    """Ray task body: rows -> the generated image and product photo (S, S, 3) uint8 at the
    inspector's size, read by the local path's reader; the reason a row cannot be read; and
    why its image is unlike AdWorld (when checking)."""

    def __init__(self, size: int, check_domain: bool, aligned: bool = False) -> None:
        self.size, self.check_domain, self.aligned = size, check_domain, aligned

    def __call__(self, batch: dict) -> dict:
        from rewardkit.commands.inspect import _BatchReader

        paths = [str(p) if p else "" for p in batch["path"]]
        n, s = len(paths), self.size
        fills = None
        if self.aligned:  # early fusion: the placed product and mask beside the photo
            fills = [None if f != f else float(f) for f in batch["fill"]]
        reader = _BatchReader(
            paths, [str(p) if p else "" for p in batch["product_path"]],
            [str(e) if e else None for e in batch["error"]], s, self.check_domain, fills,
        )  # fmt: skip
        channels = 7 if self.aligned else 3
        gen, prod = np.zeros((n, s, s, 3), np.uint8), np.zeros((n, s, s, channels), np.uint8)
        errors, unlike = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
        for j in range(n):  # one row at a time: its own reason and domain note
            g, p, idx, bad, why = reader((j, j + 1))
            if idx:
                gen[j], prod[j], unlike[j] = g[0].numpy(), p[0].numpy(), why or ""
            else:
                errors[j] = bad[0]["reason"]
        return {"row": batch["row"], "caption": batch["caption"], "gen": gen, "prod": prod,
                "height_cm": batch["height_cm"], "error": errors, "unlike": unlike}  # fmt: skip


class _Inspect(ShardActor):
    """Loads the inspector once; a batch of decoded rows -> class probabilities."""

    what = "inspection"

    def __init__(
        self, model: str, device: str, mixed_precision: str, faults: str | None = None,
        ledger=None,
    ) -> None:  # fmt: skip
        super().__init__(faults, ledger)
        from rewardkit.models.inspector import Inspector

        self.inspector = Inspector.from_pretrained(model, device)
        self.mixed_precision = mixed_precision
        self.n_classes = len(self.inspector.classes)
        self.fill = {f"p{k}": (np.float32, np.nan) for k in range(self.n_classes)}
        self.fill["unlike"] = (object, "")

    def process(self, batch: dict) -> dict:
        import torch

        from rewardkit.commands.inspect import inspect_batch  # the local path's forward

        probs = inspect_batch(
            self.inspector, torch.from_numpy(np.ascontiguousarray(batch["gen"])),
            torch.from_numpy(np.ascontiguousarray(batch["prod"])),
            [str(c) for c in batch["caption"]], self.mixed_precision,
            [float(h) for h in batch["height_cm"]] if self.inspector.uses_placement else None,
        )  # fmt: skip
        out = {"row": batch["row"], "unlike": batch["unlike"]}
        for k in range(self.n_classes):
            out[f"p{k}"] = probs[:, k].astype(np.float32)
        return out


def inspect_images_ray(
    model: str | Path,
    rows: pa.Table,
    out: str | Path,
    batch_size: int = 64,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    mixed_precision: str = "no",
    shard_rows: int = SHARD_ROWS,
    progress: bool = True,
):
    """``inspect`` on Ray (module docstring): the rows of
    :func:`~rewardkit.commands.inspect.read_inspection_input`, the local run's outputs
    (``out`` and ``<stem>.skipped.json``, see :func:`~rewardkit.commands.inspect.write_verdicts`).
    Returns (InspectionSummary, ShardRun)."""
    from rewardkit.commands.inspect import (
        INSPECTOR_HINT,
        InspectionSummary,
        placement_columns,
        write_verdicts,
    )
    from rewardkit.models.inspector import Inspector
    from rewardkit.scoring import embedded_default_in_use, warn_unlike_adworld

    start = time.perf_counter()
    out = Path(out)
    # The driver loads the inspector on its CPU once: the local path's errors for a bad
    # folder, its classes and size, and whether it is the embedded default.
    probe = Inspector.from_pretrained(model, "cpu")
    classes, size = probe.classes, probe.rfnet.config.resolution
    accept_threshold = probe.accept_threshold
    check_domain = embedded_default_in_use(probe)
    aligned = probe.uses_placement
    n = rows.num_rows
    text = {c: rows[c].to_pylist() for c in ("path", "product_path", "caption")}
    errors = rows["error"].to_pylist() if "error" in rows.column_names else [None] * n
    fills, heights = placement_columns(probe, rows, errors)  # rows without a height: errors
    del probe
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    fingerprint = _fingerprint(
        "inspect", _model_digest(model), shard_rows, device, mixed_precision,
        rows=list(zip(text["path"], text["product_path"], text["caption"], errors,
                      strict=True)),
    )  # fmt: skip
    if aligned:  # early fusion also reads where each product was placed and its height
        fingerprint = _fingerprint(fingerprint, rows=list(zip(fills, heights, strict=True)))
    source = pa.table({
        "path": pa.array([p or "" for p in text["path"]], pa.string()),
        "product_path": pa.array([p or "" for p in text["product_path"]], pa.string()),
        "caption": pa.array(text["caption"], pa.string()),
        "error": pa.array([e or "" for e in errors], pa.string()),
        "fill": pa.array([float("nan") if f is None else f for f in fills or [None] * n],
                         pa.float64()),
        "height_cm": pa.array([float("nan") if h is None else h for h in heights or [None] * n],
                              pa.float64()),
    })  # fmt: skip
    run = run_shards(
        source, _shard_dir(out), fingerprint, _Inspect,
        {"model": str(model), "device": device, "mixed_precision": mixed_precision},
        batch_size=batch_size, shard_rows=shard_rows, actors=actors,
        gpus_per_actor=gpus_per_actor, address=address,
        decode=_InspectDecode(size, check_domain, aligned), progress=progress,
        desc="inspect (ray)",
        unit="img",
    )  # fmt: skip
    t = run.table()
    if t is None:  # no rows: the local run's empty table
        t = pa.table(
            {
                "row": pa.array([], pa.int64()),
                "error": pa.array([], pa.string()),
                "unlike": pa.array([], pa.string()),
                **{f"p{k}": pa.array([], pa.float32()) for k in range(len(classes))},
            }
        )
    row, err = t["row"].to_numpy(), t["error"].to_pylist()
    ok = np.array([not e for e in err], dtype=bool)
    probs = np.stack([t[f"p{k}"].to_numpy() for k in range(len(classes))], axis=1)[ok]
    kept = row[ok].tolist()
    skipped = [{"row": int(r), "path": text["path"][r] or "", "reason": e}
               for r, e in zip(row.tolist(), err, strict=True) if e]  # fmt: skip
    if check_domain:
        notes = [u for u in t["unlike"].to_pylist() if u]
        if notes:
            warn_unlike_adworld(notes[0], INSPECTOR_HINT)  # the first in input order
    counts = write_verdicts(
        out, rows, kept, probs.astype(np.float32), classes, skipped, accept_threshold
    )
    summary = InspectionSummary(str(out), len(kept), skipped, counts, time.perf_counter() - start)
    return summary, run


# ---------------------------------------------------------------------------------------
# generate --engine ray


class _Generate(ShardActor):
    """Loads the generator (and the judge's inspector) once; a batch of products ->
    Recurrent Generation with batched refill on them, seeded by their run indices: one
    output row per attempt."""

    what = "generation"
    fill = {
        "attempt": (np.int64, 0), "seed": (np.int64, 0), "label": (object, ""),
        "score": (np.float64, np.nan), "final": (bool, False), "image": (object, b""),
        "height": (np.int64, 0), "width": (np.int64, 0), "gen_batches": (np.int64, 0),
        "device": (object, ""),
    }  # fmt: skip

    def __init__(
        self, generator: str, until_accepted: bool, judge: str, inspector: str | None,
        sampler: dict, max_attempts: int, batch_size: int, seed: int, device: str,
        mixed_precision: str, faults: str | None = None, ledger=None,
        accept_threshold: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(faults, ledger)
        from rewardkit.commands.devices import precision_dtype
        from rewardkit.commands.generate import make_judge
        from rewardkit.generation.pipeline import AdGenerator, SamplerConfig

        self.gen = AdGenerator.from_pretrained(generator, device, precision_dtype(mixed_precision))
        self.judge = make_judge(until_accepted, judge, inspector, device, accept_threshold)
        self.sampler = SamplerConfig(**sampler)
        self.max_attempts, self.batch_size, self.seed = max_attempts, batch_size, seed
        self.device, self.mixed_precision = device, mixed_precision

    def process(self, batch: dict) -> dict:
        from rewardkit.commands.devices import autocast
        from rewardkit.generation.product import prepare_product
        from rewardkit.generation.recurrent import ProductJob, recurrent_generate

        jobs = []
        for j in range(len(batch["row"])):
            h, w = int(batch["photo_h"][j]), int(batch["photo_w"][j])
            photo = np.frombuffer(batch["photo"][j], np.uint8).reshape(h, w, 4).copy()
            fill = float(batch["fill"][j])
            jobs.append(ProductJob(
                str(batch["product_id"][j]), photo,
                prepare_product(photo, self.gen.resolution, fill), str(batch["prompt"][j]),
                str(batch["caption"][j]), float(batch["height_cm"][j]), fill,
                str(batch["product_key"][j]),
            ))  # fmt: skip
        with autocast(self.device, self.mixed_precision):
            result = recurrent_generate(
                self.gen, jobs, self.judge, self.sampler, self.max_attempts, self.batch_size,
                self.seed, indices=batch["row"].tolist(),
            )  # fmt: skip
        final = {(a.product, a.attempt) for a in result.final}
        attempts = sorted(result.attempts, key=lambda a: (a.product, a.attempt))
        m = len(attempts)
        batches = np.zeros(m, np.int64)
        batches[0] = result.batches  # once per call: the sum over kept rows is the total
        return {
            "row": batch["row"][[a.product for a in attempts]],
            "attempt": np.array([a.attempt for a in attempts], np.int64),
            "seed": np.array([a.seed for a in attempts], np.int64),
            "label": np.array([a.label for a in attempts], dtype=object),
            "score": np.array([a.score for a in attempts], np.float64),
            "final": np.array([(a.product, a.attempt) in final for a in attempts], bool),
            "image": np.array([a.image.tobytes() for a in attempts], dtype=object),
            "height": np.array([a.image.shape[0] for a in attempts], np.int64),
            "width": np.array([a.image.shape[1] for a in attempts], np.int64),
            "gen_batches": batches,
            "device": np.full(m, str(self.gen.device), dtype=object),
        }


def generate_ray(
    generator: str | Path,
    jobs: list,
    out: str | Path,
    *,
    until_accepted: bool,
    judge: str,
    inspector: str | Path | None,
    max_attempts: int,
    batch_size: int,
    sampler,
    seed: int,
    accept_threshold: float | None = None,
    address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    mixed_precision: str = "no",
    shard_rows: int | None = None,
    progress: bool = True,
):
    """Recurrent Generation for ``jobs`` (``load_jobs``'s, in run order) on Ray: products
    sharded over the actors (``shard_rows`` products a shard, default
    ``GENERATE_SHARD_BATCHES`` x ``batch_size``), each shard generated with batched refill,
    every attempt seeded by (seed, run index, attempt) as in the local run. Returns
    (RecurrentResult, device, ShardRun): the attempts in the order the local run logs them
    (:func:`~rewardkit.generation.recurrent.refill_order`), so ``write_result`` writes the
    local run's files. ``batches`` is the number the actors ran."""
    from rewardkit.generation.recurrent import Attempt, RecurrentResult, refill_order
    from rewardkit.models.defaults import default_model_path

    out = Path(out)
    shard_rows = shard_rows or GENERATE_SHARD_BATCHES * batch_size
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    attempts_cap = max_attempts if until_accepted else 1
    judge_model = None
    if until_accepted and judge == "inspector":
        judge_model = str(inspector or default_model_path("rfnet"))
    fingerprint = _fingerprint(
        "generate", _model_digest(generator), until_accepted, judge, _model_digest(judge_model),
        accept_threshold, json.dumps(asdict(sampler), sort_keys=True), attempts_cap,
        batch_size, seed, shard_rows, device, mixed_precision,
        rows=[(j.product_id, j.product_key, j.prompt, j.caption, j.height_cm, j.fill)
              for j in jobs],
    )  # fmt: skip
    source = pa.table({
        "product_id": pa.array([j.product_id for j in jobs], pa.string()),
        "product_key": pa.array([j.product_key for j in jobs], pa.string()),
        "prompt": pa.array([j.prompt for j in jobs], pa.string()),
        "caption": pa.array([j.caption for j in jobs], pa.string()),
        "height_cm": pa.array([j.height_cm for j in jobs], pa.float64()),
        "fill": pa.array([j.fill for j in jobs], pa.float64()),
        "photo": pa.array([np.ascontiguousarray(j.photo).tobytes() for j in jobs], pa.binary()),
        "photo_h": pa.array([j.photo.shape[0] for j in jobs], pa.int64()),
        "photo_w": pa.array([j.photo.shape[1] for j in jobs], pa.int64()),
    })  # fmt: skip
    run = run_shards(
        source, _shard_dir(out), fingerprint, _Generate,
        {"generator": str(generator), "until_accepted": until_accepted, "judge": judge,
         "inspector": judge_model, "accept_threshold": accept_threshold,
         "sampler": asdict(sampler), "max_attempts": attempts_cap,
         "batch_size": batch_size, "seed": seed, "device": device,
         "mixed_precision": mixed_precision},
        batch_size=shard_rows, shard_rows=shard_rows, actors=actors,
        gpus_per_actor=gpus_per_actor, address=address, progress=progress,
        desc="generate (ray)", unit="product",
    )  # fmt: skip
    t = run.table()
    failed = [(r, e) for r, e in zip(t["row"].to_pylist(), t["error"].to_pylist(), strict=True)
              if e]  # fmt: skip
    if failed:
        for k in sorted({r // shard_rows for r, _ in failed}):
            run.shard_file(k).unlink(missing_ok=True)  # the same command retries them
        r, e = failed[0]
        raise ValueError(
            f"generation failed for {len(failed)} product(s) on the actors, e.g. "
            f"{jobs[r].product_id}: {e}; the other shards are kept, re-run to retry"
        )
    cols = {c: t[c].to_pylist() for c in ("row", "attempt", "seed", "label", "score", "final",
                                          "image", "height", "width")}  # fmt: skip
    by_key: dict[tuple[int, int], Attempt] = {}
    final: dict[int, Attempt] = {}
    used = [0] * len(jobs)
    for i, k, s, lab, sc, fin, img, h, w in zip(*cols.values(), strict=True):
        a = Attempt(product=i, attempt=k, seed=s, label=lab, score=sc,
                    image=np.frombuffer(img, np.uint8).reshape(h, w, 3).copy())  # fmt: skip
        by_key[(i, k)] = a
        used[i] = max(used[i], k)
        if fin:
            final[i] = a
    order, _ = refill_order(used, batch_size)
    result = RecurrentResult(
        attempts=[by_key[key] for key in order], final=[final[i] for i in range(len(jobs))],
        max_attempts=attempts_cap, seconds=run.seconds,
        batches=int(np.sum(t["gen_batches"].to_numpy())),
    )  # fmt: skip
    devices = [d for d in t["device"].to_pylist() if d]
    return result, (devices[0] if devices else device), run
