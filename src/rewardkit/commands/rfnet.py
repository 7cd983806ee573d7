"""What ``rewardkit train rfnet`` and ``rewardkit eval rfnet`` run: sample tables in, runs
and the paper's tables out.

``train_rfnet_command`` loads an AdWorld manifest (or an RF1M folder), splits it by product,
prepares the inspection inputs once into ``out/data_cache`` (disk-backed, keyed by content,
reused on resume: ``training.inspection_store``) and trains one variant, or with ``ablation`` every
variant of :data:`rewardkit.training.rfnet.VARIANTS` (full, image-only, each input removed),
each from scratch into ``out/<variant>``. ``eval_rfnet_command`` evaluates one model, or every
variant of such a folder, on held-out samples, clean and degraded (blur, noise, JPEG with
depth and saliency predicted again), and renders the tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F
import yaml

from rewardkit.commands.devices import autocast
from rewardkit.data.keys import TrainingKeys, check_held_out, write_training_keys
from rewardkit.io import write_json_atomic, write_text_atomic
from rewardkit.models.rfnet import RFNet, RFNetConfig, verdict_indices
from rewardkit.training.distributed import is_main_process
from rewardkit.training.inspection_store import prepare_inspection_store
from rewardkit.training.rfnet import (
    EARLY_VARIANTS,
    MEASUREMENT_HEADS,
    VARIANTS,
    InspectionData,
    RFNetTrainConfig,
    degrade_inspection_data,
    evaluate_rfnet,
    measurement_targets,
    prepare_inspection_data,
    train_rfnet,
    variants_for,
)

DATA_CACHE = "data_cache"  # the prepared inputs, inside the run folder

__all__ = [
    "agreement_with_oracle",
    "eval_rfnet_command",
    "load_samples",
    "oracle_labels",
    "oracle_verdicts",
    "predict_on_device",
    "set_operating_point",
    "train_rfnet_command",
]


def load_samples(source: str | Path | Sequence[str | Path], split: bool = True) -> pa.Table:
    """An AdWorld manifest (``.parquet``) or an RF1M folder, with a ``split`` by product
    (``split=False``: every row in the "test" split, for a set that is only evaluated).

    Several sources (e.g. renders and oracle-labelled generated images) are concatenated
    first (columns missing from one source are null there), so the split by product spans
    all of them."""
    from rewardkit.data.samples import load_adworld_manifest, load_rf1m, split_by_product

    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ValueError("no manifest given")
    tables = []
    for item in map(Path, sources):
        if item.is_dir():
            tables.append(load_rf1m(item))
        elif item.is_file():
            tables.append(load_adworld_manifest(item))
        else:
            raise FileNotFoundError(f"{item}: no such manifest or RF1M folder")
    table = (
        tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    )
    if split:
        return split_by_product(table)
    return table.append_column("split", pa.array(["test"] * table.num_rows))


MODEL_PRESETS = {"small": RFNetConfig.small, "paper": RFNetConfig.paper,
                 "aligned": RFNetConfig.aligned}  # fmt: skip


def _model_config(path: str | Path | None) -> RFNetConfig:
    """``--model-config``: a preset name (:data:`MODEL_PRESETS`) or an architecture YAML
    (fields over the small preset's)."""
    if path is None:
        return RFNetConfig.small()
    if str(path) in MODEL_PRESETS and not Path(path).exists():
        return MODEL_PRESETS[str(path)]()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model config not found") from None
    try:
        return RFNetConfig.from_dict({**RFNetConfig.small().to_dict(), **raw})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def _degrade_seed(config: RFNetTrainConfig) -> int | None:
    """The seed of the degraded copy training draws from (None when off); it differs from the
    evaluation's (``eval rfnet --seed``, default 0), so no degraded test image is reused."""
    if not config.degraded_copy or config.degrade <= 0:
        return None
    return config.seed + 10_007


def _training_copy(data, config: RFNetTrainConfig, maps: str):
    """The in-memory degraded copy training draws from (None when off)."""
    seed = _degrade_seed(config)
    if seed is None:
        return None
    return degrade_inspection_data(data, seed, predict_maps=maps == "predicted")


def _training_data(
    samples: pa.Table,
    model_config: RFNetConfig,
    config: RFNetTrainConfig,
    maps: str,
    out: Path,
    progress: bool,
    in_memory: bool,
) -> tuple:
    """The inspection data and its degraded copy (or None): prepared once, in chunks, into
    ``out/data_cache`` (reused by a resumed run, rebuilt when its content key changes); or,
    with ``in_memory``, decoded whole into memory (small data, tests, the memory benchmark)."""
    heads = _trained_heads(model_config, config)
    if in_memory:
        data = prepare_inspection_data(
            samples, model_config, maps=maps, progress=progress, measurements=heads
        )
        return data, _training_copy(data, config, maps)
    store = prepare_inspection_store(
        samples, model_config, out / DATA_CACHE, maps, _degrade_seed(config), progress=progress,
        measurements=heads,
    )  # fmt: skip
    return store, store.degraded()


def _check_target_columns(manifest, heads: tuple[str, ...]) -> None:
    """Name the manifest file that lacks a measurement column (several are concatenated
    before training; a file missing one would otherwise read as all NaN there)."""
    import pyarrow.parquet as pq

    sources = [manifest] if isinstance(manifest, (str, Path)) else list(manifest)
    for item in map(Path, sources):
        if heads and item.is_file():
            try:
                schema = pq.read_schema(item)
            except Exception:  # not Parquet: load_samples names the file
                continue
            measurement_targets(schema.empty_table(), heads, where=str(item))


def _trained_heads(model_config: RFNetConfig, config: RFNetTrainConfig) -> tuple[str, ...]:
    """The measurement heads a run trains (their targets are read from the manifest): the
    model's own, or the default set it is given, when ``measurement_weight > 0``."""
    if config.measurement_weight <= 0:
        return ()
    return model_config.measurements or MEASUREMENT_HEADS


def _record_keys(samples: pa.Table, model_dir: Path, init: str | Path | None) -> None:
    """Write the products (and prompts) the run trained and validated on beside its model;
    the test split is held out by construction, so it is not recorded. The main process
    alone writes (under ``accelerate launch`` every process runs this)."""
    if not is_main_process():
        return
    seen = TrainingKeys.starting_from(init)
    split = samples["split"].to_pylist()
    keys = samples["product_key"].to_pylist()
    prompts = (
        samples["prompt"].to_pylist() if "prompt" in samples.column_names else [None] * len(keys)
    )
    for role in ("train", "val"):
        rows = [i for i, s in enumerate(split) if s == role]
        seen.add("product", (keys[i] for i in rows), role)
        seen.add_prompts((prompts[i] for i in rows), role)
    write_training_keys(model_dir, seen)


def train_rfnet_command(
    manifest: str | Path | Sequence[str | Path],
    out: str | Path,
    config: RFNetTrainConfig,
    model_config: str | Path | None = None,
    variant: str = "full",
    ablation: bool = False,
    maps: str = "predicted",
    progress: bool = True,
    init: str | Path | None = None,
    in_memory: bool = False,
    accept_precision: float | None = None,
) -> dict:
    """Train one variant into ``out`` or, with ``ablation``, all into ``out/<variant>``;
    ``init``: fine-tune that RFNet folder (one variant: its own architecture and inputs).
    ``accept_precision``: give each trained model the operating point with the highest
    Available recall at that precision on the validation split
    (:func:`set_operating_point`).

    The inputs are prepared once into ``out/data_cache`` and read row by row
    (:mod:`rewardkit.training.inspection_store`); ``in_memory`` decodes them whole into
    memory instead (today's small-data path, kept for tests and the memory benchmark)."""
    if init is not None and ablation:
        raise ValueError("--init fine-tunes one model; it cannot be combined with --ablation")
    if init is not None:
        base = RFNet.from_pretrained(init).config
        _check_target_columns(manifest, _trained_heads(base, config))
        samples = load_samples(manifest)
        data, degraded = _training_data(samples, base, config, maps, Path(out), progress, in_memory)
        result = train_rfnet(
            data, Path(out), base, config, init=init, progress=progress, degraded=degraded
        )
        _record_keys(samples, Path(out) / "model", init)
        run = {"model": str(Path(out) / "model"), "from": str(init), "steps": result.steps,
               "seconds": round(result.seconds, 1), "metrics": result.metrics}  # fmt: skip
        if accept_precision is not None:
            run["operating_point"] = set_operating_point(
                Path(out) / "model", data, accept_precision
            )
        return {
            "samples": len(data),
            "split": {s: data.split.count(s) for s in set(data.split)},
            "runs": {"init": run},
        }
    base = _model_config(model_config)
    variants = variants_for(base)
    if variant not in variants:
        raise ValueError(f"--variant: expected one of {sorted(variants)}; got {variant!r}")
    full = dataclasses.replace(base, modalities=variants["full"])
    _check_target_columns(manifest, _trained_heads(full, config))
    samples = load_samples(manifest)
    data, degraded = _training_data(samples, full, config, maps, Path(out), progress, in_memory)
    names = list(variants) if ablation else [variant]
    summary = {"samples": len(data), "split": {s: data.split.count(s) for s in set(data.split)}}
    runs = {}
    for name in names:
        run_dir = Path(out) / name if ablation else Path(out)
        cfg = dataclasses.replace(base, modalities=variants[name])
        result = train_rfnet(data, run_dir, cfg, config, progress=progress, degraded=degraded)
        _record_keys(samples, run_dir / "model", None)
        runs[name] = {"model": str(run_dir / "model"), "steps": result.steps,
                      "seconds": round(result.seconds, 1), "metrics": result.metrics}  # fmt: skip
        if accept_precision is not None:
            runs[name]["operating_point"] = set_operating_point(
                run_dir / "model", data, accept_precision
            )
    summary["runs"] = runs
    if ablation and is_main_process():
        write_json_atomic(Path(out) / "runs.json", summary)
    return summary


def set_operating_point(model_dir: Path, data, min_precision: float) -> dict:
    """Choose the model's accept threshold on the ``val`` rows of ``data``
    (:func:`~rewardkit.training.rfnet.choose_accept_threshold`) and write it into its
    ``config.json`` (atomically; the weights and other files are untouched). Returns the
    choice, with the validation precision and recall it gives."""
    from rewardkit.training.rfnet import choose_accept_threshold

    rows = data.rows("val")
    if len(rows) == 0:
        raise ValueError("--accept-precision: no validation samples to choose a threshold on")
    model = RFNet.from_pretrained(model_dir)
    probs = predict_on_device(model, data, rows)
    choice = choose_accept_threshold(probs, data.labels[rows], data.classes, min_precision)
    if is_main_process():
        config = dataclasses.replace(model.config, accept_threshold=choice["accept_threshold"])
        write_text_atomic(Path(model_dir) / "config.json", config.to_json())
    return choice


def oracle_labels(samples: pa.Table, images=None, progress: bool = True) -> list[str | None]:
    """The AdWorld oracle's class for every sample (None where it cannot judge one).

    ``images``: uint8 tensors (N, 3, H, W) to judge instead of the samples' image files (the
    degraded copies). Needs the product size (``product_height_cm`` or a caption with it)."""
    from tqdm import tqdm

    from rewardkit.world.export import judge_row

    out: list[str | None] = []
    rows = samples.to_pylist()
    for i, row in enumerate(tqdm(rows, desc="oracle", disable=not progress, unit="img")):
        image = None if images is None else images[i].permute(1, 2, 0).numpy()
        try:
            out.append(judge_row(row, i, "manifest.parquet", image)[0])  # paths are absolute
        except (OSError, ValueError):
            out.append(None)
    return out


def oracle_verdicts(samples: pa.Table, degraded, progress: bool = True) -> dict | None:
    """The oracle's classes for the clean samples and for ``degraded`` (an
    :class:`InspectionData` copy of them), or None when the samples carry no product sizes
    (e.g. RF1M photos) and the oracle can judge none of them."""
    if not {"product_height_cm", "caption"} & set(samples.column_names):
        return None
    clean = oracle_labels(samples, progress=progress)
    if all(v is None for v in clean):
        return None
    return {"clean": clean, "degraded": oracle_labels(samples, degraded.generated, progress)}


def agreement_with_oracle(pred: list[str], truth: list[str | None]) -> dict:
    """Six-class and Available-or-not agreement of ``pred`` with the oracle's ``truth``,
    over the samples the oracle judged (``oracle_n``); empty when it judged none."""
    pairs = [(p, t) for p, t in zip(pred, truth, strict=True) if t is not None]
    if not pairs:
        return {}
    return {
        "oracle_agreement": sum(p == t for p, t in pairs) / len(pairs),
        "oracle_binary_agreement": sum(
            (p == "Available") == (t == "Available") for p, t in pairs
        ) / len(pairs),
        "oracle_n": len(pairs),
    }  # fmt: skip


@torch.no_grad()
def predict_on_device(
    model: RFNet,
    data: InspectionData,
    rows: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
    batch_size: int = 128,
) -> torch.Tensor:
    """Class probabilities (N, C), fp32 on the CPU, for ``rows`` of ``data`` (all when None):
    the model moved to ``device``, each batch built there, run under autocast at
    ``mixed_precision`` (``training.rfnet.predict_rfnet`` on any device)."""
    rows = torch.arange(len(data)) if rows is None else rows
    was_training = model.training
    model.to(device).eval()
    mods = tuple(model.config.modalities)
    try:
        with autocast(device, mixed_precision):
            out = [
                F.softmax(model(**data.batch(r, mods, device)).float(), dim=-1).cpu()
                for r in rows.split(batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(data.classes))


def _evaluate_model(
    model: RFNet,
    clean,
    degraded,
    oracle: dict | None = None,
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
) -> dict:
    out = {}
    threshold = model.config.accept_threshold  # the model's operating point
    for name, data in (("clean", clean), ("degraded", degraded)):
        rows = data.rows("test") if "test" in data.split else None
        probs = predict_on_device(model, data, rows, device, mixed_precision)
        labels = data.labels if rows is None else data.labels[rows]
        out[name] = evaluate_rfnet(probs, labels, data.classes, threshold)
        if oracle is not None:
            pred = [data.classes[k] for k in verdict_indices(probs, data.classes, threshold)]
            index = range(len(data)) if rows is None else rows.tolist()
            out[name].update(agreement_with_oracle(pred, [oracle[name][i] for i in index]))
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _tables(results: dict[str, dict]) -> str:
    lines = []
    for cond in ("clean", "degraded"):
        lines += [
            f"### RFNet vs image-only baseline ({cond} held-out images)",
            "",
            "| model | P | R | F1 | AP | accuracy (all classes) |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for name in ("full", "image-only"):
            if name in results:
                r = results[name][cond]
                cells = [r["precision"], r["recall"], r["f1"], r["ap"], r["accuracy"]]
                lines.append(f"| {name} | " + " | ".join(_pct(v) for v in cells) + " |")
        lines.append("")
        ablation = [n for n in results if n.startswith("no-")]
        if ablation:
            lines += [
                f"### Modality ablation ({cond}): each row trained without one input",
                "",
                "| removed | AP | accuracy |",
                "|---|--:|--:|",
            ]
            for name in ["full", *ablation]:
                r = results[name][cond]
                label = "none (full RFNet)" if name == "full" else name.removeprefix("no-")
                lines.append(f"| {label} | {_pct(r['ap'])} | {_pct(r['accuracy'])} |")
            lines.append("")
    agreeing = [n for n in results if "oracle_agreement" in results[n]["clean"]]
    if agreeing:
        lines += [
            "### Agreement with the AdWorld oracle (its verdict on the same, or degraded, image)",
            "",
            "| model | clean: 6 classes | clean: Available or not | degraded: 6 classes "
            "| degraded: Available or not | both: 6 classes |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for name in agreeing:
            c, d = results[name]["clean"], results[name]["degraded"]
            both = (
                c["oracle_agreement"] * c["oracle_n"] + d["oracle_agreement"] * d["oracle_n"]
            ) / (c["oracle_n"] + d["oracle_n"])
            cells = [c["oracle_agreement"], c["oracle_binary_agreement"],
                     d["oracle_agreement"], d["oracle_binary_agreement"], both]  # fmt: skip
            lines.append(f"| {name} | " + " | ".join(_pct(v) for v in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def eval_rfnet_command(
    manifest: str | Path,
    model: str | Path | None = None,
    runs: str | Path | None = None,
    maps: str = "predicted",
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    allow_overlap: bool = False,
    device: str | torch.device = "cpu",
    mixed_precision: str = "no",
) -> str:
    """Evaluate a model (or every run of an ablation folder) on every sample of ``manifest``.

    The products are checked against those the models trained or were chosen on
    (``rewardkit.data.keys``): any overlap raises ``OverlapError`` unless ``allow_overlap``,
    and the share is reported with the tables. Returns the Markdown tables; writes JSON
    (+ .md) to ``out``. The models run on ``device`` under autocast at ``mixed_precision``;
    the inputs (depth, saliency, caption tokens) are prepared by
    ``training.rfnet.prepare_inspection_data``, on the CPU."""
    from rewardkit.models.defaults import default_model_path

    samples = load_samples(manifest, split=False)
    if runs is not None:
        folders = {
            n: Path(runs) / n / "model"
            for n in {**VARIANTS, **EARLY_VARIANTS}
            if (Path(runs) / n / "model").is_dir()
        }
        if not folders:
            raise FileNotFoundError(f"{runs}: no <variant>/model folders (train with --ablation)")
    else:
        folders = {"full": Path(model) if model else default_model_path("rfnet")}
    overlap = check_held_out(
        {f"{name} ({folder})": folder for name, folder in folders.items()},
        product_keys=samples["product_key"].to_pylist(),
        prompts=samples["prompt"].to_pylist() if "prompt" in samples.column_names else None,
        allow_overlap=allow_overlap, where=str(manifest),
    )  # fmt: skip
    models = {n: RFNet.from_pretrained(f) for n, f in folders.items()}
    first = next(iter(models.values())).config
    needed = {m for f in models.values() for m in variants_for(f.config)["full"]}
    clean = prepare_inspection_data(
        samples, first, maps=maps, progress=progress, modalities=tuple(needed)
    )
    degraded = degrade_inspection_data(clean, seed, predict_maps=maps == "predicted")
    oracle = oracle_verdicts(samples, degraded, progress)  # judges what the models saw
    results = {
        n: _evaluate_model(m, clean, degraded, oracle, device, mixed_precision)
        for n, m in models.items()
    }
    text = _tables(results) + "\n" + overlap.describe() + "\n"
    if out is not None:
        write_json_atomic(
            Path(out),
            {"manifest": str(manifest), "results": results, "held_out": overlap.to_dict()},
        )
        write_text_atomic(Path(out).with_suffix(".md"), text + "\n")
    return text
