"""Stable identities for products and prompts, and the held-out check built on them.

A figure means something only on products and prompts that no run trained on and no choice
was made on. File names cannot tell: two folders both hold ``000000.png``, and AdWorld renders
of one seed share their products whatever ``--balance`` says. So identity is content:

- **product key**: SHA-256 over the product photo's pixels as every command reads them (RGBA,
  colour zeroed where fully transparent, so re-encoding or a different background colour under
  a transparent pixel does not change it) and the product's height in whole cm (as captions
  give it: "..., 13 cm"; "unknown" when none is given). Hex, first 16 characters (64 bits).
- **prompt key**: SHA-256 of the prompt with case and runs of white space normalised.

Every training run writes ``training_keys.parquet`` beside its model (columns ``kind``:
``product`` or ``prompt``; ``key``; ``role``: ``train``, ``val`` or ``selection``, the last for
products a run or a person chose a model on). A fine-tuned model that names a ``base``
generator inherits the base's keys. Evaluations call :func:`check_held_out`: it counts the
evaluated rows whose key a model has seen, prints the overlap, and raises
:class:`OverlapError` (the CLI exits 2) unless overlap is allowed.

Which kind is the held-out unit: the product for inspectors and generators (AdWorld prompts
come from a template vocabulary, so independent worlds share a few prompt texts by chance; that
overlap is printed, not refused), the prompt for Social Reward (pairs are split by prompt).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rewardkit.io import write_parquet_atomic

__all__ = [
    "KEYS_FILE",
    "Overlap",
    "OverlapError",
    "TrainingKeys",
    "check_held_out",
    "height_from_row",
    "manifest_keys",
    "product_key",
    "product_key_of_file",
    "product_keys_of_paths",
    "prompt_key",
    "read_training_keys",
    "write_training_keys",
]

KEYS_FILE = "training_keys.parquet"
ROLES = ("train", "val", "selection")
_CM = re.compile(r"(\d+(?:\.\d+)?)\s*cm\b")


def product_key(rgba: np.ndarray, height_cm: float | None) -> str:
    """The key of a product photo (H, W, 4) uint8 and its height in cm (None/NaN: unknown)."""
    if rgba.ndim != 3 or rgba.shape[2] != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"product_key: need an (H, W, 4) uint8 array; got {rgba.shape}")
    pixels = rgba.copy()
    pixels[pixels[..., 3] == 0] = 0  # colour under full transparency is not the product
    height = (
        "unknown"
        if height_cm is None or not math.isfinite(float(height_cm))
        else f"{float(height_cm):.0f}"  # whole cm, as captions give it
    )
    h = hashlib.sha256(b"rewardkit-product-v1\0")
    h.update(f"{pixels.shape[0]}x{pixels.shape[1]}\0{height}\0".encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()[:16]


def prompt_key(prompt: str) -> str:
    """The key of a prompt: case and white space normalised, then hashed."""
    text = " ".join(str(prompt).lower().split())
    return hashlib.sha256(b"rewardkit-prompt-v1\0" + text.encode("utf-8")).hexdigest()[:16]


def height_from_row(row: Mapping) -> float | None:
    """A row's product height: ``product_height_cm``, else "N cm" in its caption, else None."""
    h = row.get("product_height_cm")
    if h is not None and not (isinstance(h, float) and math.isnan(h)):
        return float(h)
    m = _CM.search(str(row.get("caption") or ""))
    return float(m.group(1)) if m else None


def product_key_of_file(path: str | Path, height_cm: float | None) -> str:
    """The key of a product photo file (read as every command reads product photos)."""
    from rewardkit.world.export import load_product_photo

    return product_key(load_product_photo(Path(path)), height_cm)


def product_keys_of_paths(
    paths: Sequence[str | Path | None], heights: Sequence[float | None]
) -> list[str | None]:
    """Keys of many rows, each distinct (file, height) read once; None where unreadable."""
    cache: dict[tuple[str, float | None], str | None] = {}
    out: list[str | None] = []
    for p, h in zip(paths, heights, strict=True):
        if p is None or str(p) == "":
            out.append(None)
            continue
        k = (str(p), h)
        if k not in cache:
            try:
                cache[k] = product_key_of_file(p, h)
            except (OSError, ValueError):
                cache[k] = None
        out.append(cache[k])
    return out


def manifest_keys(manifest: str | Path) -> tuple[list[str | None], list[str | None]]:
    """(product keys, prompts) of a manifest's rows (``product_path`` relative to its folder
    or absolute; height from ``product_height_cm`` or the caption)."""
    manifest = Path(manifest)
    if manifest.is_dir():
        manifest = manifest / "manifest.parquet"
    table = pq.read_table(manifest)
    if "product_path" not in table.column_names:
        raise ValueError(f"{manifest}: a product manifest needs a product_path column")
    cols = [c for c in ("product_path", "product_height_cm", "caption", "prompt")
            if c in table.column_names]  # fmt: skip
    rows = table.select(cols).to_pylist()
    paths = [manifest.parent / r["product_path"] if r["product_path"] else None for r in rows]
    keys = product_keys_of_paths(paths, [height_from_row(r) for r in rows])
    return keys, [r.get("prompt") for r in rows]


@dataclass
class TrainingKeys:
    """What a model has seen: product and prompt keys, each with the role it played."""

    products: dict[str, str] = field(default_factory=dict)  # key -> role
    prompts: dict[str, str] = field(default_factory=dict)
    known: bool = True  # False: the folder records nothing (e.g. weights brought by a user)

    def add(self, kind: str, keys: Iterable[str | None], role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"training keys: role must be one of {ROLES}; got {role!r}")
        target = self.products if kind == "product" else self.prompts
        for k in keys:
            if k is not None:
                target.setdefault(str(k), role)  # the first role recorded wins (train first)

    def add_prompts(self, prompts: Iterable[str | None], role: str) -> None:
        self.add("prompt", (prompt_key(p) for p in prompts if p), role)

    def add_manifest(self, manifest: str | Path, role: str) -> None:
        products, prompts = manifest_keys(manifest)
        self.add("product", products, role)
        self.add_prompts(prompts, role)

    @classmethod
    def starting_from(cls, model: str | Path | None) -> TrainingKeys:
        """New keys that already hold what the starting model (fine-tuned from) has seen."""
        keys = cls()
        if model is not None and Path(model).is_dir():
            keys.update(read_training_keys(model))
        return keys

    def update(self, other: TrainingKeys) -> None:
        for k, r in other.products.items():
            self.products.setdefault(k, r)
        for k, r in other.prompts.items():
            self.prompts.setdefault(k, r)
        self.known = self.known or other.known


def write_training_keys(folder: str | Path, keys: TrainingKeys) -> Path:
    """Write ``training_keys.parquet`` into ``folder`` (atomically; sorted, so same keys give
    the same bytes)."""
    rows = sorted(
        [("product", k, r) for k, r in keys.products.items()]
        + [("prompt", k, r) for k, r in keys.prompts.items()]
    )
    table = pa.table(
        {
            "kind": pa.array([r[0] for r in rows], pa.string()),
            "key": pa.array([r[1] for r in rows], pa.string()),
            "role": pa.array([r[2] for r in rows], pa.string()),
        }
    )
    path = Path(folder) / KEYS_FILE
    write_parquet_atomic(path, table)
    return path


def read_training_keys(folder: str | Path) -> TrainingKeys:
    """The keys a model folder records, with those of the base generator it names (a
    fine-tuned ``model/`` holds only the changed component); ``known=False`` if none."""
    folder = Path(folder)
    keys = TrainingKeys(known=False)
    path = folder / KEYS_FILE
    if path.is_file():
        try:
            table = pq.read_table(path, columns=["kind", "key", "role"])
        except Exception as e:
            raise ValueError(f"{path}: not a readable training-keys file ({e})") from None
        keys.known = True
        for kind, key, role in zip(*(table[c].to_pylist() for c in ("kind", "key", "role")),
                                   strict=True):  # fmt: skip
            (keys.products if kind == "product" else keys.prompts).setdefault(key, role)
    card = folder / "rewardkit_generator.json"
    if card.is_file():
        base = json.loads(card.read_text()).get("base")
        if base:
            base_dir = (folder / base).resolve() if not Path(base).is_absolute() else Path(base)
            if base_dir != folder.resolve() and base_dir.is_dir():
                keys.update(read_training_keys(base_dir))
    return keys


@dataclass
class Overlap:
    """Evaluated rows whose key some model has seen, per model and over all."""

    kind: str  # "product" or "prompt": the held-out unit checked
    rows: int  # rows evaluated (with a key)
    seen_rows: int  # rows whose key any model has seen
    per_model: dict[str, int]  # model name -> rows it has seen
    unknown: list[str]  # models whose folders record no training keys
    prompt_rows: int = 0  # informational: rows whose prompt a model has seen (product checks)

    @property
    def share(self) -> float:
        return self.seen_rows / self.rows if self.rows else 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "rows": self.rows,
            "seen_rows": self.seen_rows,
            "share": round(self.share, 4),
            "per_model": self.per_model,
            "unknown_models": self.unknown,
            "prompt_rows_seen": self.prompt_rows,
        }

    def describe(self) -> str:
        seen = ", ".join(f"{m}: {n}" for m, n in self.per_model.items() if n) or "none"
        text = (
            f"held-out check: {self.seen_rows} of {self.rows} evaluated {self.kind}s "
            f"({100 * self.share:.1f}%) were seen in training or model choice ({seen})"
        )
        if self.kind == "product" and self.prompt_rows:
            text += f"; {self.prompt_rows} rows share a prompt text with training (not refused)"
        if self.unknown:
            text += f"; no training keys recorded for: {', '.join(self.unknown)}"
        return text


class OverlapError(ValueError):
    """Evaluated data overlaps what a model trained or was chosen on (CLI exit 2)."""


def check_held_out(
    models: Mapping[str, str | Path | TrainingKeys | None],
    product_keys: Sequence[str | None] | None = None,
    prompts: Sequence[str | None] | None = None,
    kind: str = "product",
    allow_overlap: bool = False,
    where: str = "",
    quiet: bool = False,
) -> Overlap:
    """Count evaluated rows that the ``models`` (name -> folder or keys) have seen.

    ``kind`` is the held-out unit: ``product`` (``product_keys`` required; prompt overlap is
    counted for information) or ``prompt`` (``prompts`` required). Prints the overlap on
    stderr unless ``quiet``; raises :class:`OverlapError` when any row was seen and
    ``allow_overlap`` is false, naming the data (``where``), the count and the models.
    """
    if kind not in ("product", "prompt"):
        raise ValueError(f"check_held_out: kind must be product or prompt; got {kind!r}")
    loaded = {
        name: m if isinstance(m, TrainingKeys) else read_training_keys(m)
        for name, m in models.items()
        if m is not None
    }
    pkeys = [prompt_key(p) if p else None for p in prompts] if prompts is not None else None
    main = product_keys if kind == "product" else pkeys
    if main is None:
        raise ValueError(f"check_held_out: {kind} keys needed")
    per_model = {}
    seen_any = [False] * len(main)
    for name, keys in loaded.items():
        table = keys.products if kind == "product" else keys.prompts
        hits = [k is not None and k in table for k in main]
        per_model[name] = sum(hits)
        seen_any = [a or b for a, b in zip(seen_any, hits, strict=True)]
    prompt_rows = 0
    if kind == "product" and pkeys is not None:
        prompt_rows = sum(
            k is not None and any(k in m.prompts for m in loaded.values()) for k in pkeys
        )
    overlap = Overlap(
        kind=kind,
        rows=sum(k is not None for k in main),
        seen_rows=sum(seen_any),
        per_model=per_model,
        unknown=[n for n, k in loaded.items() if not k.known],
        prompt_rows=prompt_rows,
    )
    if not quiet:
        print(f"{where + ': ' if where else ''}{overlap.describe()}", file=sys.stderr)
    if overlap.seen_rows and not allow_overlap:
        raise OverlapError(
            f"{where + ': ' if where else ''}{overlap.seen_rows} of {overlap.rows} "
            f"{kind}s were seen by "
            + ", ".join(f"{m} ({n})" for m, n in per_model.items() if n)
            + "; evaluate on held-out data, or pass --allow-overlap to report it anyway"
        )
    return overlap
