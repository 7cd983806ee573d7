"""Weight-space interpolation of a fine-tuned generator toward its base (WiSE-FT; Wortsman et
al. 2022, "Robust fine-tuning of zero-shot models"; the reward-versus-diversity reading of it
is Rame et al. 2023, "Rewarded soups"). Experiment for issue 23 (MODELS.md, "RFFT weights
interpolated toward the base").

    python recipes/interpolate_generator.py --tuned RUN/model --alpha 0.8 --out DIR
    python recipes/interpolate_generator.py --tuned RUN_S0/model RUN_S1/model --alpha 1 --out DIR

Several ``--tuned`` folders make a model soup (Wortsman et al. 2022, "Model soups"): their
uniform mean takes the place of ``tuned`` below. They must share one base and carry the same
components; the soup's ``training_keys.parquet`` is the union of theirs.

Every component folder the fine-tuned model carries itself (``rewardkit finetune
--trainable controlnet`` writes ``controlnet/``; ``--trainable all`` also ``unet/``) is written
to ``DIR`` as ``base + alpha * (tuned - base)``, tensor by tensor, with ``base`` the same
component of the generator the run fine-tuned (its card's ``"base"``). ``alpha`` 0 is the base,
1 the fine-tuned model, above 1 extrapolates along the fine-tuning direction. The card is
copied with ``"base"`` pointing at the same base from ``DIR``, and ``interpolation.json``
records the sources and alpha. The fine-tuned model's ``training_keys.parquet`` is copied
(a soup's: the union of its members'): the result has seen exactly what its ends saw.

Refuses, on one line, a tuned folder without a card or a base, a component whose tensors do
not match the base's by name and shape, and LoRA-only folders (no full weights to mix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rewardkit.generation.pipeline import component_folders
from rewardkit.io import write_text_atomic

CARD = "rewardkit_generator.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_same(
    base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], where: str, whose: str = "base"
) -> None:
    """Refuse, naming ``where``, tensors whose names or shapes differ from ``base``'s."""
    if set(base) != set(tuned):
        extra = sorted(set(tuned) - set(base))[:3]
        missing = sorted(set(base) - set(tuned))[:3]
        raise SystemExit(
            f"{where}: tensors differ from the {whose}'s (extra {extra}, missing {missing})"
        )
    for name, b in base.items():
        t = tuned[name]
        if t.shape != b.shape:
            raise SystemExit(
                f"{where}: {name} has shape {tuple(t.shape)}, the {whose}'s {tuple(b.shape)}"
            )


def mix(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float, where: str):
    """``base + alpha * (tuned - base)`` for every tensor; names and shapes must agree."""
    check_same(base, tuned, where)
    return {
        name: (b.float() + alpha * (tuned[name].float() - b.float())).to(b.dtype).contiguous()
        if b.is_floating_point() else tuned[name].clone()
        for name, b in base.items()
    }  # fmt: skip


def _card_base_own(tuned: Path) -> tuple[dict, Path, list[str]]:
    card_path = tuned / CARD
    if not card_path.is_file():
        raise SystemExit(f"{tuned}: no {CARD} (not a model written by rewardkit finetune)")
    card = json.loads(card_path.read_text())
    if not card.get("base"):
        raise SystemExit(f'{card_path}: no "base" (nothing to interpolate toward)')
    own = sorted(p.name for p in tuned.iterdir() if p.is_dir() and (p / WEIGHTS).is_file())
    if not own:
        raise SystemExit(
            f"{tuned}: no component folder with {WEIGHTS} (LoRA-only models are not mixed)"
        )
    return card, (tuned / card["base"]).resolve(), own


def interpolate(tuned: Path | list[Path], alpha: float, out: Path) -> Path:
    soup = [tuned] if isinstance(tuned, Path) else list(tuned)
    card, base_dir, own = _card_base_own(soup[0])
    for other in soup[1:]:
        _, other_base, other_own = _card_base_own(other)
        if other_base != base_dir:
            raise SystemExit(f"{other}: base {other_base}, not {soup[0]}'s {base_dir}")
        if other_own != own:
            raise SystemExit(f"{other}: components {other_own}, not {soup[0]}'s {own}")
    base_parts = component_folders(base_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(soup, card, base_dir, base_parts, own, alpha, out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left beside out
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    component_folders(out)  # the result loads as a generator layout
    return out


def soup_mean(parts: list[dict[str, torch.Tensor]], wheres: list[str]) -> dict[str, torch.Tensor]:
    """The uniform mean of several state dicts; a member whose names or shapes differ from
    the first's is refused by its ``where``."""
    first = parts[0]
    for other, where in zip(parts[1:], wheres[1:], strict=True):
        check_same(first, other, where, whose=f"first member ({wheres[0]})")
    return {
        name: (torch.stack([p[name].float() for p in parts]).mean(0).to(t.dtype).contiguous()
               if t.is_floating_point() else t.clone())
        for name, t in first.items()
    }  # fmt: skip


def write_key_union(paths: list[Path], dest: Path) -> None:
    """The distinct rows of several training-key tables (string columns; pandas 3 and polars
    write ``large_string``, cast to one schema first), sorted."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in paths]
    schema = pa.schema([(f.name, pa.string()) for f in tables[0].schema])
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
    rows = table.group_by(schema.names).aggregate([])
    order = pc.sort_indices(rows, [(c, "ascending") for c in schema.names])
    pq.write_table(rows.take(order), dest)


def _write(soup, card, base_dir, base_parts, own, alpha, out, tmp) -> None:
    for comp in own:
        srcs = [t / comp for t in soup]
        base_weights = base_parts[comp] / WEIGHTS
        if not base_weights.is_file():
            raise SystemExit(f"{base_parts[comp]}: no {WEIGHTS} to interpolate {srcs[0]} toward")
        tuned = soup_mean([load_file(str(s / WEIGHTS)) for s in srcs], [str(s) for s in srcs])
        mixed = mix(load_file(str(base_weights)), tuned, alpha, str(srcs[0]))
        (tmp / comp).mkdir()
        shutil.copy(srcs[0] / "config.json", tmp / comp / "config.json")
        save_file(mixed, str(tmp / comp / WEIGHTS))
    if (soup[0] / "model_index.json").is_file():
        shutil.copy(soup[0] / "model_index.json", tmp / "model_index.json")
    keys = [t / "training_keys.parquet" for t in soup if (t / "training_keys.parquet").is_file()]
    if len(keys) == 1:
        shutil.copy(keys[0], tmp / "training_keys.parquet")
    elif keys:
        write_key_union(keys, tmp / "training_keys.parquet")
    card["base"] = os.path.relpath(base_dir, out.resolve())
    write_text_atomic(tmp / CARD, json.dumps(card, indent=2) + "\n")
    record = {
        "tuned": [str(t.resolve()) for t in soup] if len(soup) > 1 else str(soup[0].resolve()),
        "base": str(base_dir),
        "alpha": alpha,
        "components": own,
    }
    write_text_atomic(tmp / "interpolation.json", json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tuned", required=True, type=Path, nargs="+",
        help="a finetune run's model/ folder; several: their mean (a soup)",
    )  # fmt: skip
    ap.add_argument("--alpha", required=True, type=float, help="0 = base, 1 = fine-tuned")
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args(argv)
    for tuned in a.tuned:
        if not tuned.is_dir():
            raise SystemExit(f"--tuned {tuned}: not a folder")
    if not -1.0 <= a.alpha <= 3.0:
        raise SystemExit(f"--alpha {a.alpha}: expected a value in [-1, 3]")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    print(interpolate(a.tuned, a.alpha, a.out.resolve()))


if __name__ == "__main__":
    main()
