"""Batched scoring of folders and manifests: skips, per-image equality, resume, errors."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rewardkit.io import (
    png_bytes,
    read_image,
    read_image_rgb,
    write_parquet_atomic,
    write_png_atomic,
)
from rewardkit.models.scorers import Scorer, create_scorer
from rewardkit.models.social_reward import images_to_pixel_values
from rewardkit.scoring import (
    DomainWarning,
    ScoreSummary,
    SkippedImage,
    embedded_default_in_use,
    list_images,
    score_images,
)
from tests.models.test_social_reward import make_tiny_vtde

GOOD = [f"img{i}.png" for i in range(8)] + ["photo.jpg", "sub/tall.png"]  # sorted order
BAD = ["broken.png", "fake.jpg"]  # image suffixes, unreadable
SKIPPED = [*BAD, "notes.txt"]  # and a file that is not an image: listed, with its reason


def make_folder(root: Path, seed: int = 0) -> Path:
    """8 PNGs and a JPEG at 40x40, a 48x36 PNG in a subfolder, a truncated PNG, a text file
    named .jpg (both bad) and a .txt (not an image suffix: skipped without being read)."""
    rng = np.random.default_rng(seed)
    for name in GOOD[:8]:
        write_png_atomic(root / name, rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "photo.jpg")
    write_png_atomic(root / "sub" / "tall.png", rng.integers(0, 256, (48, 36, 3), dtype=np.uint8))
    data = png_bytes(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (root / "broken.png").write_bytes(data[: len(data) // 2])
    (root / "fake.jpg").write_text("not an image")
    (root / "notes.txt").write_text("not an image")
    return root


def per_image_scores(scorer: Scorer, files: list[Path], prompts: list[str]) -> np.ndarray:
    """The reference: each image read and scored alone."""
    out = []
    for f, p in zip(files, prompts, strict=True):
        x = torch.from_numpy(read_image_rgb(f).copy()).permute(2, 0, 1)[None].float() / 255
        out.append(scorer.score_batch(x, [p])[0].item())
    return np.asarray(out, dtype=np.float32)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Scorer:
    model = make_tiny_vtde(tmp_path_factory.mktemp("model") / "m", pooling="mean")
    return create_scorer("social-reward", model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images"))


def test_folder_scores_good_images_and_reports_bad_ones(scorer, folder, tmp_path):
    out = tmp_path / "res" / "scores.parquet"
    summary = score_images(scorer, folder, out, batch_size=4, prompt="a red shoe", progress=False)
    assert isinstance(summary, ScoreSummary)
    assert summary.scored == len(GOOD) and summary.resumed == 0 and summary.out == out
    assert [s.path for s in summary.skipped] == SKIPPED
    assert all(isinstance(s, SkippedImage) and s.reason for s in summary.skipped)
    reasons = [s.reason for s in summary.skipped]
    assert "unreadable image" in reasons[0] and "not an image file" in reasons[1]
    assert reasons[2].startswith("not an image file type ('.txt'")
    table = pq.read_table(out)
    assert table.column_names == ["path", "prompt", "score"]
    assert table.schema.field("score").type == pa.float32()
    assert table.column("path").to_pylist() == GOOD
    assert set(table.column("prompt").to_pylist()) == {"a red shoe"}
    report = json.loads((tmp_path / "res" / "scores.skipped.json").read_text())
    assert [s["path"] for s in report["skipped"]] == SKIPPED
    assert summary.skipped_report == tmp_path / "res" / "scores.skipped.json"
    assert not (tmp_path / "res" / "scores.partial.parquet").exists()
    assert summary.to_dict()["skipped"] == 3 and summary.to_dict()["scored"] == len(GOOD)


@pytest.mark.parametrize("batch_size, workers", [(4, 2), (16, 0), (3, 1)])
def test_batched_scores_equal_per_image_scores(scorer, folder, tmp_path, batch_size, workers):
    out = tmp_path / "s.parquet"
    score_images(scorer, folder, out, batch_size=batch_size, prompt="a cat on a mat",
                 progress=False, num_workers=workers)  # fmt: skip
    batched = pq.read_table(out).column("score").to_numpy()
    reference = per_image_scores(scorer, [folder / p for p in GOOD], ["a cat on a mat"] * 10)
    # The batch of 16 mixes 40x40 and 48x36 images: resizing to the scorer's input first
    # gives each image the score it gets alone.
    np.testing.assert_allclose(batched, reference, rtol=0, atol=1e-5)


def test_manifest_prompts_ids_and_carried_columns(scorer, folder, tmp_path):
    rel = Path(os.path.relpath(folder, tmp_path)).as_posix()  # e.g. ../../images0
    paths = [f"{rel}/img0.png", str(folder / "img1.png"), f"{rel}/sub/tall.png", "gone.png", None]
    manifest = pa.table({
        "image_id": pa.array([10, 11, 12, 13, 14], pa.int64()),
        "label": ["a", "b", "c", "d", "e"],
        "path": paths,
        "prompt": ["a red shoe", None, "blue bag", "x", "y"],
    })  # fmt: skip
    write_parquet_atomic(tmp_path / "manifest.parquet", manifest)
    summary = score_images(scorer, tmp_path / "manifest.parquet", tmp_path / "m.parquet",
                           batch_size=2, prompt="default", progress=False)  # fmt: skip
    assert summary.scored == 3
    assert [(s.path, s.reason) for s in summary.skipped] == [
        ("gone.png", "image file not found"),
        ("", "row 4: empty path"),
    ]
    table = pq.read_table(tmp_path / "m.parquet")
    assert table.column_names == ["path", "prompt", "image_id", "score", "label"]
    assert table.column("image_id").to_pylist() == [10, 11, 12]
    assert table.column("label").to_pylist() == ["a", "b", "c"]
    prompts = ["a red shoe", "default", "blue bag"]  # the null prompt takes the default
    assert table.column("prompt").to_pylist() == prompts
    files = [folder / "img0.png", folder / "img1.png", folder / "sub/tall.png"]
    reference = per_image_scores(scorer, files, prompts)
    np.testing.assert_allclose(table.column("score").to_numpy(), reference, rtol=0, atol=1e-5)


def test_resume_from_checkpoint(scorer, folder, tmp_path, monkeypatch):
    out = tmp_path / "scores.parquet"
    partial = tmp_path / "scores.partial.parquet"
    original = scorer.score_batch
    calls: list[int] = []

    def failing(images, prompts, batch_size=32):
        if len(calls) == 2:
            raise RuntimeError("power cut")
        calls.append(images.shape[0])
        return original(images, prompts, batch_size=batch_size)

    monkeypatch.setattr(scorer, "score_batch", failing, raising=False)
    with pytest.raises(RuntimeError, match="power cut"):
        score_images(scorer, folder, out, batch_size=3, progress=False, num_workers=0,
                     checkpoint_every=1)  # fmt: skip
    assert not out.exists() and partial.is_file()
    saved = pq.read_table(partial)
    # Two batches of 3 finished (broken, fake, img0 | img1-3), then the failure.
    assert saved.num_rows == sum(calls) == 4

    def counting(images, prompts, batch_size=32):
        calls.append(images.shape[0])
        return original(images, prompts, batch_size=batch_size)

    calls.clear()
    monkeypatch.setattr(scorer, "score_batch", counting, raising=False)
    summary = score_images(scorer, folder, out, batch_size=3, progress=False)
    assert summary.resumed == 4 and sum(calls) == len(GOOD) - 4  # only the rest is scored
    assert summary.scored == len(GOOD) and [s.path for s in summary.skipped] == SKIPPED
    assert not partial.exists()
    monkeypatch.undo()
    fresh = score_images(scorer, folder, tmp_path / "fresh.parquet", progress=False)
    resumed, again = pq.read_table(out), pq.read_table(tmp_path / "fresh.parquet")
    assert resumed.select(["path", "prompt"]).equals(again.select(["path", "prompt"]))
    np.testing.assert_allclose(resumed["score"].to_numpy(), again["score"].to_numpy(), atol=1e-5)
    assert fresh.resumed == 0


def test_checkpoint_of_another_run_is_not_resumed(scorer, folder, tmp_path, monkeypatch):
    out = tmp_path / "scores.parquet"
    original = scorer.score_batch

    def failing(images, prompts, batch_size=32):
        raise KeyboardInterrupt

    monkeypatch.setattr(scorer, "score_batch", failing, raising=False)
    with pytest.raises(KeyboardInterrupt):
        score_images(scorer, folder, out, batch_size=4, prompt="one", progress=False)
    assert (tmp_path / "scores.partial.parquet").is_file()  # the skips so far are kept
    monkeypatch.setattr(scorer, "score_batch", original, raising=False)
    with pytest.warns(UserWarning, match="different input, prompt or scorer"):
        summary = score_images(scorer, folder, out, batch_size=4, prompt="two", progress=False)
    assert summary.resumed == 0 and summary.scored == len(GOOD)
    assert set(pq.read_table(out).column("prompt").to_pylist()) == {"two"}


def test_any_callable_with_the_reward_signature(folder, tmp_path):
    def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))  # (B,)

    summary = score_images(brightness, folder, tmp_path / "b.parquet", batch_size=32,
                           progress=False)  # fmt: skip
    assert summary.scored == len(GOOD)
    scores = pq.read_table(tmp_path / "b.parquet").column("score").to_numpy()
    # Unknown input size: mixed sizes meet at the smallest edge (36), a centre crop.
    expected = [read_image_rgb(folder / p).mean() / 255 for p in GOOD[:-1]]
    np.testing.assert_allclose(scores[:-1], expected, rtol=0, atol=1e-2)
    assert 0.4 < scores[-1] < 0.6


def test_list_images_recursive_sorted_by_suffix(folder):
    names = [p.relative_to(folder).as_posix() for p in list_images(folder)]
    assert names == sorted(GOOD + BAD)


def test_input_errors_name_the_file(scorer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        score_images(scorer, tmp_path / "nowhere", tmp_path / "o.parquet", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no images found"):
        score_images(scorer, tmp_path / "empty", tmp_path / "o.parquet", progress=False)
    write_parquet_atomic(tmp_path / "m.parquet", pa.table({"file": ["a.png"]}))
    with pytest.raises(ValueError, match=r"m\.parquet: manifest is missing column 'path'"):
        score_images(scorer, tmp_path / "m.parquet", tmp_path / "o.parquet", progress=False)
    write_parquet_atomic(tmp_path / "n.parquet", pa.table({"path": [1, 2]}))
    with pytest.raises(ValueError, match=r"n\.parquet: column 'path' must hold strings"):
        score_images(scorer, tmp_path / "n.parquet", tmp_path / "o.parquet", progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt: not a folder or a readable Parquet"):
        score_images(scorer, tmp_path / "notes.txt", tmp_path / "o.parquet", progress=False)
    with pytest.raises(ValueError, match="would overwrite the input"):
        score_images(scorer, tmp_path / "m.parquet", tmp_path / "m.parquet", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        score_images(scorer, tmp_path, tmp_path / "o.parquet", batch_size=0, progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_folder_without_images_names_what_it_skipped(scorer, tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.txt").write_text("x")
    (tmp_path / "only" / "b.psd").write_text("x")
    with pytest.raises(ValueError, match=r"no images found .*skipped a.txt: not an image file "
                       r"type \('.txt'.* and 1 more"):  # fmt: skip
        score_images(scorer, tmp_path / "only", tmp_path / "o.parquet", progress=False)


@pytest.mark.parametrize(
    "kind",
    [pa.large_string(), pa.string_view(), pa.dictionary(pa.int32(), pa.string())],
    ids=["large_string", "string_view", "dictionary"],
)
def test_manifest_path_and_prompt_columns_of_any_string_type(scorer, folder, tmp_path, kind):
    paths = [str(folder / p) for p in GOOD[:3]]
    prompts = ["a red shoe", "blue bag", "a red shoe"]
    plain = tmp_path / "plain.parquet"
    write_parquet_atomic(plain, pa.table({"path": paths, "prompt": prompts}))
    typed = tmp_path / "typed.parquet"
    columns = {"path": pa.array(paths).cast(kind), "prompt": pa.array(prompts).cast(kind)}
    write_parquet_atomic(typed, pa.table(columns))
    assert pq.read_schema(typed).field("path").type == kind
    a = score_images(scorer, plain, tmp_path / "a.parquet", progress=False)
    b = score_images(scorer, typed, tmp_path / "b.parquet", progress=False)
    assert a.scored == b.scored == 3 and not b.skipped
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert tb["path"].to_pylist() == paths and tb["prompt"].to_pylist() == prompts
    np.testing.assert_allclose(ta["score"].to_numpy(), tb["score"].to_numpy(), rtol=0, atol=1e-6)


class InputRecorder(Scorer):
    """A scorer with a 32 px input that keeps what it sees, resized as CLIP resizes."""

    image_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, prompts: list[str], **context) -> torch.Tensor:
        zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
        self.seen.append(images_to_pixel_values(images, 32, zero, one))  # (B, 3, 32, 32)
        return torch.zeros(images.shape[0])


def test_large_images_are_decoded_reduced_and_reach_the_scorer_as_full_decodes(tmp_path):
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate([(1200, 900), (2400, 1600), (700, 700)]):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        big = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        big.save(tmp_path / f"big{i}.jpg", quality=95)
    files = sorted(tmp_path.glob("*.jpg"))
    recorder = InputRecorder()
    summary = score_images(recorder, tmp_path, tmp_path / "s.parquet", progress=False)
    assert summary.scored == 3
    seen = torch.cat(recorder.seen)  # (3, 3, 32, 32), in folder order (one prompt)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    for k, f in enumerate(files):
        full = torch.from_numpy(read_image(f).copy()).permute(2, 0, 1)[None].float() / 255
        reference = images_to_pixel_values(full, 32, zero, one)[0]
        difference = (seen[k] - reference).abs()  # rounding to uint8 alone gives 0.25 / 255
        assert difference.mean() < 1 / 255 and difference.max() < 6 / 255, f.name
    reduced = read_image(files[1], target_side=32)  # what the loader gave the scorer
    assert 64 <= min(reduced.shape[:2]) < 128  # 1600 px: 1/8 by the DCT, then by 3


def test_domain_warning_only_for_the_embedded_model_on_large_images(scorer, folder, tmp_path):
    from rewardkit.models.defaults import default_model_path

    big = tmp_path / "big"
    big.mkdir()
    for i in range(2):
        Image.fromarray(np.full((300, 400, 3), 90 + i, np.uint8)).save(big / f"{i}.png")
    embedded = create_scorer("social-reward", default_model_path("social-reward"))
    assert embedded_default_in_use(embedded) and not embedded_default_in_use(scorer)
    with pytest.warns(DomainWarning) as seen:
        score_images(embedded, big, tmp_path / "e.parquet", batch_size=1, progress=False)
    messages = [str(w.message) for w in seen if issubclass(w.category, DomainWarning)]
    assert len(messages) == 1 and "0.png: 400 x 300 px" in messages[0]
    assert "--model DIR" in messages[0] and "CLIP ViT-L/14" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DomainWarning)
        score_images(scorer, big, tmp_path / "t.parquet", progress=False)  # a user's model
        score_images(embedded, folder, tmp_path / "f.parquet", progress=False)  # 40 px images
