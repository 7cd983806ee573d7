"""Batch scoring on Ray (``rewardkit score --engine ray``): decode in tasks, score in actors.

Ray Data reads the rows (a folder listing or a manifest, as ``score`` reads them), decodes the
images in parallel tasks (the shared reader, reduced to the scorer's input side, unreadable
files kept as counted skips), and runs the scorer in a pool of actors
(``map_batches`` with a callable class and ``ActorPoolStrategy``): each actor loads the model
once, on its own GPU when ``gpus_per_actor`` > 0.

The rows are cut into shards of ``shard_rows``; the driver writes each shard's scores as
``<out stem>.shards/shard-NNNNN.parquet`` (atomically, with the run's fingerprint) as soon as
its last row arrives, and a re-run of the same command skips finished shards. At the end the
shards are merged into ``out`` (input order, the local path's columns) and the skipped rows
into ``<out stem>.skipped.json``.

Faults: a batch that raises inside an actor is scored again one row at a time (rows that
still fail are skipped with the error) and counted; an actor that dies is restarted by Ray
and its batch retried (``max_restarts``, ``max_task_retries``), and its restart is counted.
The driver keeps the first result of a row, so every row is scored exactly once.
``RK_RAY_FAULTS`` (a folder) injects one raising batch and one actor exit, for the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rewardkit.io import write_json_atomic, write_parquet_atomic

__all__ = ["RayScoreSummary", "score_images_ray"]

SHARD_ROWS = 4096
FINGERPRINT_KEY = b"rewardkit_ray_shard"


@dataclass
class RayScoreSummary:
    out: Path
    scored: int
    skipped: list[dict]
    seconds: float
    shards: int
    shards_resumed: int
    actors: int
    batch_failures: int = 0  # batches that raised in an actor and were scored row by row
    actor_restarts: int = 0  # actors Ray restarted after they died
    duplicates_dropped: int = 0  # results of rows already scored (a retried batch)
    skipped_report: Path | None = None
    counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["out"], d["skipped_report"] = str(self.out), str(self.skipped_report)
        d["skipped"] = len(self.skipped)
        return d


def _model_digest(model: str | Path | None) -> str:
    """Names, sizes and times of the model folder's files (the driver does not load it)."""
    h = hashlib.sha256()
    if model is not None and Path(model).exists():
        root = Path(model)
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root) if root.is_dir() else p.name}:{st.st_size}:"
                         f"{st.st_mtime_ns};".encode())  # fmt: skip
    return h.hexdigest()


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


class _Score:
    """Ray actor body: loads the scorer once; a batch of decoded rows -> scores."""

    def __init__(self, name: str, model: str | None, device: str, mixed_precision: str) -> None:
        import ray

        from rewardkit.models.scorers import create_scorer

        self.scorer = create_scorer(name, model, device=device)
        self.device, self.mixed_precision = device, mixed_precision
        self.batches = 0
        ctx = ray.get_runtime_context()
        self.restarted = int(bool(getattr(ctx, "was_current_actor_reconstructed", False)))

    def _scores(self, pixels: np.ndarray, prompts: list[str]) -> np.ndarray:
        import torch

        from rewardkit.commands.devices import autocast
        from rewardkit.scoring import _score  # the local path's call (score_batch, checks)

        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))  # (B, 3, S, S)
        with autocast(self.device, self.mixed_precision):
            return _score(self.scorer, x, list(prompts), len(prompts)).numpy()

    def __call__(self, batch: dict) -> dict:
        self.batches += 1
        _maybe_fault(self.batches)
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        scores = np.full(len(ok), np.nan, np.float64)
        errors = np.array(list(batch["error"]), dtype=object)
        failed = 0
        if ok.any():
            prompts = [str(p) for p in batch["prompt"][ok]]
            try:
                _maybe_raise(self.batches)
                scores[ok] = self._scores(batch["pixels"][ok], prompts)
            except Exception:  # noqa: BLE001 (a model error must not lose the batch)
                failed = 1
                for i in np.flatnonzero(ok):
                    try:
                        scores[i] = self._scores(
                            batch["pixels"][i : i + 1], [str(batch["prompt"][i])]
                        )[0]
                    except Exception as err:  # noqa: BLE001
                        errors[i] = f"scoring failed: {type(err).__name__}: {err}"
        restarted, self.restarted = self.restarted, 0
        n = len(ok)
        return {
            "row": batch["row"], "score": scores, "error": errors,
            "batch_failed": np.full(n, failed), "actor_restarted": np.full(n, restarted),
        }  # fmt: skip


def _fault_marker(kind: str) -> Path | None:
    folder = os.environ.get("RK_RAY_FAULTS")
    if not folder:
        return None
    marker = Path(folder) / kind
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once per run
    except FileExistsError:
        return None
    os.close(fd)
    return marker


def _maybe_raise(batches: int) -> None:
    if batches == 1 and _fault_marker("raised") is not None:
        raise RuntimeError("injected fault: this batch raises (RK_RAY_FAULTS)")


def _maybe_fault(batches: int) -> None:
    if batches == 2 and _fault_marker("exited") is not None:
        os._exit(1)  # the actor dies mid-run (RK_RAY_FAULTS)


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
    import ray
    from ray.data import ActorPoolStrategy

    from rewardkit.models.scorers import available_scorers
    from rewardkit.scoring import _output_table, _read_input

    start = time.perf_counter()
    if scorer_name not in available_scorers():
        raise ValueError(
            f"unknown scorer {scorer_name!r}; available: {', '.join(available_scorers())}"
        )
    if actors < 1 or batch_size < 1 or shard_rows < 1:
        raise ValueError(
            "--actors, --batch-size and the shard size must be >= 1; got "
            f"{actors}, {batch_size}, {shard_rows}"
        )
    out = Path(out)
    rows, files, unlisted = _read_input(Path(input), prompt)
    paths = rows.column("path").to_pylist()
    prompts = rows.column("prompt").to_pylist()
    h = hashlib.sha256(
        f"{Path(input).resolve()}\0{scorer_name}\0{_model_digest(model)}\0{shard_rows}".encode()
    )
    for p, q in zip(paths, prompts, strict=True):
        h.update(f"{p}\0{q}\1".encode())
    fingerprint = h.hexdigest()
    n = len(paths)
    n_shards = (n + shard_rows - 1) // shard_rows
    shard_dir = out.with_name(out.stem + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)

    def shard_file(k: int) -> Path:
        return shard_dir / f"shard-{k:05d}.parquet"

    def finished(k: int) -> bool:
        f = shard_file(k)
        if not f.is_file():
            return False
        meta = pq.read_schema(f).metadata or {}
        return meta.get(FINGERPRINT_KEY) == fingerprint.encode()

    done_shards = {k for k in range(n_shards) if finished(k)}
    pending = [i for i in range(n) if i // shard_rows not in done_shards]
    counts = {"batch_failures": 0, "actor_restarts": 0, "duplicates_dropped": 0}
    device = "cuda" if gpus_per_actor > 0 else "cpu"  # the actors' device, not the driver's
    if pending:
        side = _scorer_side(scorer_name, model)
        init = {"address": address, "ignore_reinit_error": True, "include_dashboard": False,
                "log_to_driver": False}  # fmt: skip
        if os.environ.get("RK_RAY_FAULTS"):
            init["runtime_env"] = {"env_vars": {"RK_RAY_FAULTS": os.environ["RK_RAY_FAULTS"]}}
        started_here = not ray.is_initialized()
        ray.init(**init)
        try:
            _run(ray, ActorPoolStrategy, pending, files, prompts, side, scorer_name, model,
                 device, mixed_precision, batch_size, actors, gpus_per_actor, shard_rows, n,
                 shard_file, fingerprint, counts, progress)  # fmt: skip
        finally:
            if started_here:
                ray.shutdown()
    # Merge the shards: the local path's table and skip report.
    scores: dict[int, float] = {}
    skipped: dict[int, str] = {}
    for k in range(n_shards):
        t = pq.read_table(shard_file(k))
        for r, s, e in zip(
            t["row"].to_pylist(), t["score"].to_pylist(), t["error"].to_pylist(), strict=True
        ):
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
        seconds=time.perf_counter() - start, shards=n_shards, shards_resumed=len(done_shards),
        actors=actors, skipped_report=report, counts={"rows": n}, **counts,
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


def _run(ray, ActorPoolStrategy, pending, files, prompts, side, scorer_name, model, device,
         mixed_precision, batch_size, actors, gpus_per_actor, shard_rows, n, shard_file,
         fingerprint, counts, progress) -> None:  # fmt: skip
    from tqdm import tqdm

    source = pa.table({
        "row": pa.array(pending, pa.int64()),
        "file": pa.array([str(files[i]) if files[i] is not None else "" for i in pending]),
        "prompt": pa.array([str(prompts[i]) for i in pending]),
    })  # fmt: skip
    ds = ray.data.from_arrow(source).repartition(max(1, len(pending) // batch_size))
    decoded = ds.map_batches(  # tasks: decoding scales with the cluster's CPUs
        _Decode(side), batch_size=batch_size, batch_format="numpy", num_cpus=0.5,
    )  # fmt: skip
    scored = decoded.map_batches(
        _Score, fn_constructor_kwargs={"name": scorer_name, "model": str(model) if model else None,
                                       "device": device, "mixed_precision": mixed_precision},
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor, num_cpus=0.5,
        max_restarts=-1, max_task_retries=-1,
    )  # fmt: skip
    expected: dict[int, int] = {}
    for i in pending:
        expected[i // shard_rows] = expected.get(i // shard_rows, 0) + 1
    got: dict[int, dict[int, tuple[float, str]]] = {k: {} for k in expected}
    bar = tqdm(total=len(pending), desc="score (ray)", disable=not progress, unit="img")
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        counts["batch_failures"] += int(np.max(batch["batch_failed"], initial=0))
        counts["actor_restarts"] += int(np.max(batch["actor_restarted"], initial=0))
        for r, s, e in zip(
            batch["row"].tolist(), batch["score"].tolist(), batch["error"].tolist(), strict=True
        ):
            k = r // shard_rows
            if r in got[k]:
                counts["duplicates_dropped"] += 1
                continue
            got[k][r] = (s, e or "")
            bar.update()
            if len(got[k]) == expected[k]:
                items = sorted(got[k].items())
                t = pa.table({
                    "row": pa.array([r for r, _ in items], pa.int64()),
                    "score": pa.array([v[0] if not v[1] else None for _, v in items], pa.float64()),
                    "error": pa.array([v[1] for _, v in items], pa.string()),
                }).replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode()})  # fmt: skip
                write_parquet_atomic(shard_file(k), t)
    bar.close()
    missing = {k: expected[k] - len(got[k]) for k in expected if len(got[k]) != expected[k]}
    if missing:
        raise RuntimeError(
            f"Ray returned no result for some rows of shard(s) {missing}; re-run to finish them"
        )
