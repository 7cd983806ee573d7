"""Batched scoring of image folders and manifests with any scorer.

:func:`score_images` runs a scorer with the shared reward signature
``scorer(images [B,3,H,W] in [0,1], prompts) -> [B]`` over

* a folder: every image file under it (``rewardkit.io.IMAGE_SUFFIXES``: PNG, JPEG, WebP,
  TIFF, BMP, GIF; recursively, sorted), with one prompt for all; or
* a manifest: a Parquet file with a ``path`` column (relative to the manifest's folder, or
  absolute) and optionally ``prompt``, ``image_id`` and any other columns, which are carried
  through to the output.

Images are decoded by background threads while the model scores the previous batch, each
already reduced toward the scorer's input size (``rewardkit.io.decode_image``), so memory
follows the batch and not the files. Bad or missing images, and every entry of a folder that
is not an image (other files, hidden files, broken links), are skipped and reported with the
reason, never fatal. When the embedded default model scores images unlike AdWorld's (files
much larger than its renders), a :class:`DomainWarning` says so once per run. Finished scores
are checkpointed to ``<stem>.partial.parquet`` beside the output every few batches; a re-run
with the same input, prompt and scorer resumes from it, and it is deleted once the output is
written.

Files written beside ``out`` (say ``scores.parquet``):

==========================  =================================================================
``scores.parquet``          path, prompt, [image_id], score (float32), [other manifest columns]
``scores.skipped.json``     the images that could not be scored, each with the reason
``scores.partial.parquet``  the checkpoint; exists only while a run is unfinished
==========================  =================================================================
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from rewardkit import io as rkio
from rewardkit.io import (
    IMAGE_SUFFIXES,
    DecodedImage,
    decode_image,
    write_json_atomic,
    write_parquet_atomic,
)
from rewardkit.loading import read_ahead
from rewardkit.models.social_reward import images_to_pixel_values

__all__ = [
    "IMAGE_SUFFIXES",
    "DomainWarning",
    "ScoreSummary",
    "SkippedImage",
    "embedded_default_in_use",
    "input_side",
    "list_images",
    "load_scorer_image",
    "score_images",
    "score_tensor",
    "scorer_input",
    "stack_images",
    "unlike_adworld",
]
CHECKPOINT_EVERY = 20  # batches between checkpoints: at most 20 batches are ever re-scored
FINGERPRINT_KEY = b"rewardkit_fingerprint"
SKIPPED_KEY = b"rewardkit_skipped"

RewardFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SkippedImage:
    """An input that could not be scored.

    Attributes:
        path: The path as given (relative to the folder, or as written in the manifest;
            empty for a manifest row without one).
        reason: Why it was skipped (missing file, unreadable image, empty path).
    """

    path: str
    reason: str


@dataclass
class ScoreSummary:
    """What :func:`score_images` did.

    Attributes:
        out: The output Parquet file.
        scored: Rows written to ``out``.
        skipped: Inputs that could not be scored, in input order.
        seconds: Wall time of this call.
        resumed: Scores taken from a checkpoint of an earlier, interrupted run.
        skipped_report: The JSON file listing ``skipped``.
    """

    out: Path
    scored: int
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0
    resumed: int = 0
    skipped_report: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (``skipped`` as a count; the list is in ``skipped_report``)."""
        return {
            "scored": self.scored,
            "skipped": len(self.skipped),
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "out": str(self.out),
            "skipped_report": None if self.skipped_report is None else str(self.skipped_report),
        }


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, by suffix, case-insensitive), sorted.

    The entries that are not used, with the reason: :func:`rewardkit.io.list_images`."""
    return rkio.list_images(folder)[0]


def score_images(
    scorer: nn.Module | RewardFn,
    input: str | os.PathLike,
    out: str | os.PathLike,
    batch_size: int = 32,
    prompt: str = "",
    progress: bool = True,
    num_workers: int = 2,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> ScoreSummary:
    """Score every image of a folder or manifest and write the scores as Parquet.

    Args:
        scorer: A :class:`~rewardkit.models.scorers.Scorer` (its ``score_batch`` is used) or
            any callable with the reward signature ``(images, prompts) -> (B,)``.
        input: A folder of images, or a manifest Parquet file with a ``path`` column.
        out: The output Parquet file (written atomically).
        batch_size: Images per forward pass.
        prompt: The prompt of every image of a folder, and of manifest rows without one.
        progress: Show a progress bar.
        num_workers: Processes decoding upcoming batches while the model runs (a DataLoader;
            0: decode in the calling process).
        checkpoint_every: Write the checkpoint every this many batches.

    Returns:
        The summary: counts, the skipped inputs with reasons, timings and paths.

    Raises:
        FileNotFoundError: ``input`` does not exist.
        ValueError: A folder without images, a file that is not a Parquet manifest, or a
            manifest without a string ``path`` column (the message names file and column).
    """
    start = time.perf_counter()
    if batch_size <= 0 or checkpoint_every <= 0 or num_workers < 0:
        raise ValueError(
            f"batch_size and checkpoint_every must be positive and num_workers >= 0; got "
            f"{batch_size}, {checkpoint_every}, {num_workers}"
        )
    out = Path(out)
    if out.exists() and out.resolve() == Path(input).resolve():
        raise ValueError(f"{out}: the output would overwrite the input manifest")
    rows, files, unlisted = _read_input(Path(input), prompt)
    partial = out.with_name(out.stem + ".partial.parquet")
    prompts = rows.column("prompt").to_pylist()
    paths = rows.column("path").to_pylist()
    fingerprint = _fingerprint(Path(input), paths, prompts, scorer)

    done, skipped = _read_checkpoint(partial, fingerprint)  # {row: score}, {row: reason}
    resumed = len(done)
    for i, f in enumerate(files):
        if f is None and i not in skipped:
            skipped[i] = f"row {i}: empty path"
    pending = [i for i in range(len(files)) if i not in done and i not in skipped]
    # Batches of similar prompts: less padding in the text tower, and repeated prompts meet
    # in one batch. The output keeps the input order.
    pending.sort(key=lambda i: (len(prompts[i]), prompts[i], i))
    side = _input_side(scorer)
    check_domain = embedded_default_in_use(scorer)

    def checkpoint() -> None:
        _write_checkpoint(partial, fingerprint, paths, done, skipped)

    bar = tqdm(total=len(files), initial=len(files) - len(pending), desc="score", unit="img",
               disable=not progress)  # fmt: skip
    batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
    pin = _on_cuda(scorer)
    loader = _prefetch(batches, files, side, num_workers, check_domain, pin)
    try:
        for n, (index, images, bad, unlike) in enumerate(loader):
            skipped.update(bad)
            if unlike is not None and check_domain:
                warn_unlike_adworld(unlike, SCORER_HINT)
                check_domain = False  # once per run
            if index:
                scores = _score(scorer, images, [prompts[i] for i in index], batch_size)
                done.update(zip(index, scores.tolist(), strict=True))
            bar.update(len(index) + len(bad))
            if (n + 1) % checkpoint_every == 0:
                checkpoint()
    except BaseException:
        if done or skipped:  # an interrupt or a failing model keeps the work done so far
            checkpoint()
        raise
    finally:
        loader.close()  # stops the decoding threads now, also on errors
        bar.close()

    order = sorted(done)
    table = _output_table(rows, order, [done[i] for i in order])
    write_parquet_atomic(out, table)
    skipped_list = [SkippedImage(paths[i] or "", skipped[i]) for i in sorted(skipped)]
    if unlisted:  # a folder's rows are sorted by path: the merged list is in folder order
        skipped_list = sorted(unlisted + skipped_list, key=lambda s: s.path)
    report = out.with_name(out.stem + ".skipped.json")
    write_json_atomic(
        report,
        {"input": str(input), "out": str(out), "skipped": [asdict(s) for s in skipped_list]},
    )
    partial.unlink(missing_ok=True)
    return ScoreSummary(
        out=out,
        scored=table.num_rows,
        skipped=skipped_list,
        seconds=time.perf_counter() - start,
        resumed=resumed,
        skipped_report=report,
    )


# ---------------------------------------------------------------------------------------
# Inputs.


def _read_input(
    source: Path, prompt: str
) -> tuple[pa.Table, list[Path | None], list[SkippedImage]]:
    """Rows to score (path, prompt, carried columns), the file of each (None: no path), and
    a folder's entries that are not images, with the reason."""
    if source.is_dir():
        files, others = rkio.list_images(source)
        unlisted = [SkippedImage(p.relative_to(source).as_posix(), why) for p, why in others]
        if not files:
            seen = f"; skipped {unlisted[0].path}: {unlisted[0].reason}" if unlisted else ""
            more = f" and {len(unlisted) - 1} more" if len(unlisted) > 1 else ""
            raise ValueError(
                f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, "
                f"recursively){seen}{more}"
            )
        rel = [f.relative_to(source).as_posix() for f in files]
        table = pa.table({"path": pa.array(rel, pa.string()), "prompt": [prompt] * len(rel)})
        return table, list(files), unlisted
    if not source.exists():
        raise FileNotFoundError(f"{source}: input not found (expected a folder or a manifest)")
    return (*_read_manifest(source, prompt), [])


def _read_manifest(path: Path, prompt: str) -> tuple[pa.Table, list[Path | None]]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for non-Parquet files
        raise ValueError(f"{path}: not a folder or a readable Parquet manifest ({e})") from None
    if "path" not in table.column_names:
        raise ValueError(
            f"{path}: manifest is missing column 'path' (image paths, relative to the "
            f"manifest's folder or absolute); have {table.column_names}"
        )
    path_type = table.schema.field("path").type
    if not _is_text(path_type):
        raise ValueError(f"{path}: column 'path' must hold strings; got {path_type}")
    if path_type != pa.string():  # large_string (pandas 3, polars), string_view, dictionary
        index = table.schema.get_field_index("path")
        table = table.set_column(index, "path", table.column("path").cast(pa.string()))
    if "prompt" in table.column_names:
        try:
            prompts = pc.fill_null(table.column("prompt").cast(pa.string()), prompt)
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: column 'prompt' must hold strings ({e})") from None
        table = table.set_column(table.schema.get_field_index("prompt"), "prompt", prompts)
    else:
        table = table.append_column("prompt", pa.array([prompt] * table.num_rows, pa.string()))
    base = path.parent
    files = [None if not p else base / p for p in table.column("path").to_pylist()]
    return table, files


def _is_text(kind: pa.DataType) -> bool:
    """string, large_string, string_view, or a dictionary of one of them."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    )


def _output_table(rows: pa.Table, order: list[int], scores: list[float]) -> pa.Table:
    """The scored rows in input order: path, prompt, [image_id], score, then the rest."""
    taken = rows.take(pa.array(order, pa.int64()))
    first = [c for c in ("path", "prompt", "image_id") if c in taken.column_names]
    rest = [c for c in taken.column_names if c not in first and c != "score"]
    columns = {c: taken.column(c) for c in first}
    columns["score"] = pa.array(np.asarray(scores, dtype=np.float32), pa.float32())
    columns.update({c: taken.column(c) for c in rest})
    return pa.table(columns)


# ---------------------------------------------------------------------------------------
# Loading: decode and stack batches in DataLoader worker processes.


Loaded = tuple[list[int], torch.Tensor | None, dict[int, str], str | None]


def _prefetch(
    batches: list[list[int]],
    files: list[Path | None],
    side: int | None,
    num_workers: int,
    check_domain: bool = False,
    pin: bool = False,
) -> Iterator[Loaded]:
    """Yield loaded batches in order, decoded ahead by ``num_workers`` DataLoader processes
    (``loading.read_ahead``; 0: in this process), pinned for a CUDA scorer."""
    load = functools.partial(_load_batch, files=files, side=side, check_domain=check_domain)
    yield from read_ahead(load, batches, num_workers, pin)


def _load_batch(
    batch: list[int], files: list[Path | None], side: int | None, check_domain: bool = False
) -> Loaded:
    """Decode a batch, each image reduced toward ``side``: (rows loaded, images (B, 3, H, W)
    in [0, 1] or None, {row: reason}, why the first image unlike AdWorld is, if asked)."""
    index, arrays, bad = [], [], {}
    unlike = None
    for i in batch:
        path = files[i]
        try:
            array, decoded = load_scorer_image(path, side)
        except (OSError, ValueError) as e:
            bad[i] = str(e).removeprefix(f"{path}: ")
            continue
        arrays.append(array)
        index.append(i)
        if check_domain and unlike is None and (why := unlike_adworld(decoded)) is not None:
            unlike = f"{path}: {why}"
    return index, _stack(arrays, side) if arrays else None, bad, unlike


def load_scorer_image(path: str | os.PathLike, side: int | None) -> tuple[np.ndarray, DecodedImage]:
    """An image file as the scorer's batches take it: (H, W, 3) uint8, decoded reduced toward
    ``side`` (``rewardkit.io.decode_image``); a reduced decode gets the scorer's crop now,
    with the full image's geometry (:func:`scorer_input`). Also returns the decode. The
    batch loader and ``rewardkit serve`` read images through it.

    Raises:
        OSError, ValueError: The file cannot be read (the message starts with the path).
    """
    decoded = decode_image(path, "RGB", target_side=side)  # (H, W, 3) uint8
    array = decoded.array if decoded.reduction == 1 else scorer_input(decoded, side)
    return array, decoded


def stack_images(arrays: Sequence[np.ndarray], side: int | None) -> torch.Tensor:
    """(H, W, 3) uint8 images -> the (B, 3, H, W) batch a scorer is given (see ``_stack``)."""
    return _stack(arrays, side)


def score_tensor(
    scorer: nn.Module | RewardFn, images: torch.Tensor, prompts: list[str], batch_size: int
) -> torch.Tensor:
    """Scores (B,) float32 on CPU of a stacked batch: the forward every scoring path runs."""
    return _score(scorer, images, prompts, batch_size)


def input_side(scorer: nn.Module | RewardFn) -> int | None:
    """The square input size the scorer resizes to, or None when it does not say."""
    return _input_side(scorer)


def scorer_input(image: DecodedImage, side: int) -> np.ndarray:
    """The (side, side, 3) uint8 image a scorer with square input ``side`` sees of a file:
    shorter edge to ``side``, antialiased bilinear, centre crop (``images_to_pixel_values``).

    The crop is placed by the file's full size, so an image decoded reduced
    (``image.reduction > 1``) gives the pixels the full decode would: the crop's region is
    resampled from the reduced pixels (PIL, antialiased bilinear, fractional box). A
    full-size decode goes through ``images_to_pixel_values`` itself.
    """
    array = image.array
    if image.reduction == 1:
        x = torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float().div_(255.0)
        zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        fitted = images_to_pixel_values(x, side, zero, one)[0]  # (3, side, side) in [0, 1]
        return fitted.mul(255.0).round_().clamp_(0, 255).byte().permute(1, 2, 0).numpy()
    w, h = image.width, image.height
    scale = side / min(w, h)
    new_w, new_h = max(side, round(w * scale)), max(side, round(h * scale))
    left, top = (new_w - side) // 2, (new_h - side) // 2
    # The crop in file pixels, then in decoded pixels (each covers `reduction` file pixels).
    fx, fy = w / new_w / image.reduction, h / new_h / image.reduction
    box = (left * fx, top * fy, (left + side) * fx, (top + side) * fy)
    resized = Image.fromarray(array).resize((side, side), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized)


def _stack(arrays: Sequence[np.ndarray], side: int | None) -> torch.Tensor:
    """(H, W, 3) uint8 images -> (B, 3, H, W) float in [0, 1].

    Images of one size are stacked as they are (the scorer resizes them itself). Mixed sizes
    are brought to ``side`` x ``side`` first, the way the scorer would (shortest edge to
    ``side``, antialiased bilinear, centre crop), so a score does not depend on which other
    images share its batch. ``side`` is the scorer's input size, or when unknown the smallest
    edge in the batch.
    """
    if all(a.shape == arrays[0].shape for a in arrays):
        # numpy, not torch: torch ops in a loader thread would start their own thread team.
        x = np.stack(arrays).transpose(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / np.float32(255))
    side = side or min(min(a.shape[:2]) for a in arrays)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    resized = []
    for a in arrays:
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float().div_(255.0)  # (1,3,H,W)
        resized.append(images_to_pixel_values(x, side, zero, one))  # (1, 3, side, side)
    return torch.cat(resized)  # (B, 3, side, side)


def _on_cuda(scorer: nn.Module | RewardFn) -> bool:
    """Whether the scorer's weights sit on a CUDA device (batches are then pinned)."""
    if not isinstance(scorer, nn.Module):
        return False
    return any(p.device.type == "cuda" for p in scorer.parameters())


def _input_side(scorer: nn.Module | RewardFn) -> int | None:
    """The square input size the scorer resizes to (``image_size`` of its first submodule
    that has one, e.g. SocialReward), or None when it does not say."""
    if not isinstance(scorer, nn.Module):
        return None
    for module in scorer.modules():
        size = getattr(module, "image_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None


# ---------------------------------------------------------------------------------------
# The embedded models' domain: they were trained on AdWorld renders only.

# The embedded models see 64 px renders; a shorter side over 4x that is other data. (Colour
# statistics were tried and dropped: at 64 px the embedded generator's own images reach 77%
# distinct colours, natural photos 71-88%, so they cannot tell the two apart.)
ADWORLD_MAX_SIDE = 256
SCORER_HINT = (
    "pass real weights with --model DIR: a CLIPModel or VisionTextDualEncoderModel folder "
    "(e.g. CLIP ViT-L/14 saved with save_pretrained; --scorer clip-score for an untuned one)"
)


class DomainWarning(UserWarning):
    """The embedded default models are used on images unlike AdWorld's."""


def embedded_default_in_use(model: object) -> bool:
    """Whether ``model`` (or any submodule) was loaded from the package's embedded models
    (``config._name_or_path`` of transformers models, or a ``name_or_path`` attribute)."""
    if not isinstance(model, nn.Module):
        return False
    root = (Path(str(resources.files("rewardkit"))) / "assets" / "models").resolve()
    for module in model.modules():
        config = getattr(module, "config", None)
        for source in (getattr(module, "name_or_path", None),
                       getattr(config, "_name_or_path", None)):  # fmt: skip
            if isinstance(source, (str, os.PathLike)) and str(source):
                if Path(source).resolve().is_relative_to(root):
                    return True
    return False


def unlike_adworld(image: DecodedImage) -> str | None:
    """Why an image is unlike AdWorld's renders (a file much larger than they are), or
    None."""
    if min(image.width, image.height) > ADWORLD_MAX_SIDE:
        return f"{image.width} x {image.height} px (AdWorld renders are 64-256 px)"
    return None


def warn_unlike_adworld(example: str, hint: str) -> None:
    """The :class:`DomainWarning` for ``example`` ("<path>: <why>"), with what to do."""
    warnings.warn(
        f"the embedded default models know only AdWorld (small procedural ad renders), and "
        f"these images are unlike it, e.g. {example}; their results say little about such "
        f"images. For real images {hint}.",
        DomainWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------
# Scoring.


def _score(
    scorer: nn.Module | RewardFn, images: torch.Tensor, prompts: list[str], batch_size: int
) -> torch.Tensor:
    """Scores (B,) as float32 on CPU, without autograd bookkeeping."""
    with torch.inference_mode():
        score_batch = getattr(scorer, "score_batch", None)
        if callable(score_batch):
            scores = score_batch(images, prompts, batch_size=batch_size)
        else:
            scores = scorer(images, prompts)
    scores = scores.detach().float().cpu().reshape(-1)
    if scores.shape[0] != images.shape[0]:
        raise ValueError(f"scorer returned {scores.shape[0]} scores for {images.shape[0]} images")
    return scores


# ---------------------------------------------------------------------------------------
# Checkpoints.


def _fingerprint(
    source: Path, paths: list[str | None], prompts: list[str], scorer: nn.Module | RewardFn
) -> str:
    """Identifies a run: the input, its rows and prompts, and the scorer (kind, name, shapes
    and a checksum of its weights). A checkpoint is resumed only under the same fingerprint."""
    h = hashlib.sha256()
    kind = type(scorer).__qualname__ if isinstance(scorer, nn.Module) else repr(scorer)
    h.update(f"{source.resolve()}\0{kind}\0{getattr(scorer, 'name', '')}\0".encode())
    if isinstance(scorer, nn.Module):
        with torch.no_grad():
            for p in scorer.parameters():
                # ~4k strided values per tensor: tells weights apart without a full pass.
                sample = p.detach().flatten()[:: max(1, p.numel() // 4096)]
                total = float(sample.sum(dtype=torch.float64))
                h.update(f"{tuple(p.shape)}:{total:.10e};".encode())
    for path, prompt in zip(paths, prompts, strict=True):
        h.update(f"{path}\0{prompt}\1".encode())
    return h.hexdigest()


def _read_checkpoint(partial: Path, fingerprint: str) -> tuple[dict[int, float], dict[int, str]]:
    """Scores and skips of an interrupted run with the same fingerprint; empty otherwise."""
    if not partial.is_file():
        return {}, {}
    try:
        table = pq.read_table(partial)
        meta = table.schema.metadata or {}
        if meta.get(FINGERPRINT_KEY, b"").decode() != fingerprint:
            warnings.warn(
                f"{partial}: checkpoint of a different input, prompt or scorer; starting over",
                stacklevel=3,
            )
            return {}, {}
        skipped = {int(k): v for k, v in json.loads(meta[SKIPPED_KEY]).items()}
        index, scores = table.column("index").to_pylist(), table.column("score").to_pylist()
    except Exception as e:  # a damaged checkpoint only costs the work it held
        warnings.warn(f"{partial}: unreadable checkpoint ({e}); starting over", stacklevel=3)
        return {}, {}
    return dict(zip(index, scores, strict=True)), skipped


def _write_checkpoint(
    partial: Path,
    fingerprint: str,
    paths: list[str | None],
    done: dict[int, float],
    skipped: dict[int, str],
) -> None:
    order = sorted(done)
    table = pa.table(
        {
            "index": pa.array(order, pa.int64()),
            "path": pa.array([paths[i] for i in order], pa.string()),
            "score": pa.array([done[i] for i in order], pa.float32()),
        }
    )
    meta = {FINGERPRINT_KEY: fingerprint.encode(), SKIPPED_KEY: json.dumps(skipped).encode()}
    write_parquet_atomic(partial, table.replace_schema_metadata(meta))
