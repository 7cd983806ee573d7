"""The one image reader and folder lister, and every command on a corpus of hostile files."""

import json
import os
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFile

from rewardkit import io as rkio
from rewardkit.cli import main
from rewardkit.data.samples import load_product_rgb, load_resized
from rewardkit.io import decode_image, list_images, probe_image, read_image
from rewardkit.scoring import DomainWarning, scorer_input
from rewardkit.training.loop import load_images
from tests.hostile import (
    BIG_SIDE,
    adworld_cutout,
    build_hostile_corpus,
    on_white,
    write_label_manifest,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_hostile_corpus(tmp_path_factory.mktemp("hostile"), big=True)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return build_hostile_corpus(tmp_path_factory.mktemp("hostile_small"), big=False)


# ---------------------------------------------------------------------------------------
# The reader.


def test_every_bad_file_raises_an_error_naming_it_and_why(small_corpus):
    folder = small_corpus.folder
    for name in ("empty.png", "truncated.png", "text.png", "bomb_20000.png", "broken_link.png"):
        error = FileNotFoundError if name == "broken_link.png" else ValueError
        with pytest.raises(error) as info:
            read_image(folder / name)
        message = str(info.value)
        assert message.startswith(f"{folder / name}: ")
        assert small_corpus.bad[name] in message, message
    with pytest.raises(FileNotFoundError, match="nothing.png: image file not found"):
        read_image(folder / "nothing.png")
    with pytest.raises(ValueError, match="a folder, not an image file"):
        read_image(folder)
    with pytest.raises(ValueError, match="notes.txt: not an image file"):
        read_image(folder / "notes.txt")


def test_a_decompression_bomb_is_refused_from_its_header(small_corpus, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    bomb = small_corpus.folder / "bomb_20000.png"
    start = time.perf_counter()
    for read in (read_image, probe_image):
        with pytest.raises(ValueError, match=r"image too large \(20000 x 20000 pixels, limit"):
            read(bomb)
    assert time.perf_counter() - start < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's warning nor its error escapes
        with pytest.raises(ValueError, match="image too large"):
            read_image(bomb)


def test_the_pixel_limit_is_checked_for_images_pil_would_open(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((50, 80, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(rkio, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"a.png: image too large \(80 x 50 pixels, limit 1000\)"):
        read_image(tmp_path / "a.png")


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, small_corpus):
    eight, sixteen = (read_image(small_corpus.folder / n, "L") for n in small_corpus.grey_pair)
    np.testing.assert_array_equal(eight, sixteen)
    ramp = np.linspace(0, 65535, 256 * 16).reshape(16, 256).astype(np.uint16)
    expected = np.round(ramp / 257.0).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")  # I;16
    assert Image.open(tmp_path / "ramp.png").mode == "I;16"
    Image.fromarray(ramp.astype(">u2")).save(tmp_path / "ramp_be.tif")  # I;16B
    assert Image.open(tmp_path / "ramp_be.tif").mode == "I;16B"
    Image.fromarray(ramp.astype(np.int32)).save(tmp_path / "ramp32.tif")  # I
    for name in ("ramp.png", "ramp_be.tif", "ramp32.tif"):
        grey = read_image(tmp_path / name, "L")
        np.testing.assert_array_equal(grey, expected, err_msg=name)
        rgb = read_image(tmp_path / name, "RGB")
        assert rgb.shape == (16, 256, 3) and abs(float(rgb.mean()) - 127.5) < 1


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, 1), (8, 3)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    rng = np.random.default_rng(orientation)
    upright = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    stored = np.ascontiguousarray(np.rot90(upright, turn))  # as a camera stores it
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    decoded = decode_image(tmp_path / "r.png")
    np.testing.assert_array_equal(decoded.array, upright)
    assert (decoded.width, decoded.height) == (50, 30)
    probe = probe_image(tmp_path / "r.png")
    assert (probe.width, probe.height) == (50, 30) and probe.format == "PNG"
    # Reduced decodes are turned too (the turn is applied after the reduction).
    big = np.kron(upright, np.ones((8, 8, 1), np.uint8))  # (240, 400, 3)
    Image.fromarray(np.ascontiguousarray(np.rot90(big, turn))).save(tmp_path / "b.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "b.png", target_side=15), upright)


def test_exif_rotated_jpeg_equals_the_upright_picture(small_corpus):
    rotated = read_image(small_corpus.folder / "exif_rotated.jpg").astype(np.float32)
    assert np.abs(rotated - small_corpus.upright).mean() < 3  # JPEG loss only
    unturned = np.rot90(small_corpus.upright, 1).astype(np.float32)
    assert np.abs(rotated - unturned).mean() > 10


def test_cmyk_palette_greyscale_alpha_and_other_formats(tmp_path, small_corpus):
    folder = small_corpus.folder
    picture = on_white(adworld_cutout(7, 64))
    for suffix in ("tif", "bmp"):  # lossless
        np.testing.assert_array_equal(read_image(folder / f"photo.{suffix}"), picture)
    assert np.abs(read_image(folder / "photo.gif").astype(int) - picture).mean() < 4
    cmyk = read_image(folder / "cmyk.jpg").astype(int)
    original = on_white(adworld_cutout(1, 64)).astype(int)
    assert cmyk.shape == (64, 64, 3) and np.abs(cmyk - original).mean() < 4
    palette = read_image(folder / "palette.png", "RGBA")
    assert set(np.unique(palette[..., 3])) == {0, 255}  # the white index is transparent
    rgb = read_image(folder / "palette.png")  # transparent pixels composited on white
    assert (rgb[palette[..., 3] == 0] == 255).all()
    # LA: alpha kept for RGBA, composited on white for RGB and L.
    la = np.stack([np.full((4, 4), 20, np.uint8), np.array([[0, 255] * 2] * 4, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgba = read_image(tmp_path / "la.png", "RGBA")
    assert rgba[0, 0].tolist() == [20, 20, 20, 0] and rgba[0, 1].tolist() == [20, 20, 20, 255]
    assert read_image(tmp_path / "la.png", "RGB")[0, :2].tolist() == [[255] * 3, [20] * 3]
    assert read_image(tmp_path / "la.png", "L")[0, :2].tolist() == [255, 20]
    opaque = read_image(folder / "adworld.jpg", "RGBA")
    assert (opaque[..., 3] == 255).all()
    unicode_name = read_image(folder / "café_商品.png")
    assert unicode_name.shape == (64, 64, 3)


def test_large_jpeg_is_decoded_reduced_and_close_to_the_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)
    full = np.asarray(Image.fromarray(base).resize((3000, 2000), Image.Resampling.BICUBIC))
    Image.fromarray(full).save(tmp_path / "big.jpg", quality=92)
    decoded = decode_image(tmp_path / "big.jpg", target_side=64)
    assert (decoded.width, decoded.height) == (3000, 2000)
    h, w = decoded.array.shape[:2]
    assert 128 <= h < 256 and abs(w / h - 1.5) < 0.02  # shorter side in [2t, 4t)
    reference = read_image(tmp_path / "big.jpg")  # full size
    assert reference.shape == (2000, 3000, 3)

    def at_64(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((96, 64), Image.Resampling.BILINEAR), float)

    assert np.abs(at_64(decoded.array) - at_64(reference)).mean() < 2


def test_strip_reduction_equals_reducing_the_whole_image(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (403, 611, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    palette = Image.fromarray(rgba[..., :3]).quantize(colors=32)
    palette.save(tmp_path / "p.png", transparency=3)
    with Image.open(tmp_path / "p.png") as saved:
        assert saved.mode == "P" and saved.info["transparency"] == 3
        whole = {
            "a.png": Image.fromarray(rgba).reduce(5),
            "p.png": saved.convert("RGBA").reduce(5),
        }
    assert (np.asarray(whole["p.png"])[..., 3] < 255).any()
    monkeypatch.setattr(rkio, "_STRIP_PIXELS", 20_000)  # ~30 strips
    for name, expected in whole.items():
        got = read_image(tmp_path / name, "RGBA", target_side=40)  # 403 // 80 = 5
        np.testing.assert_array_equal(got, np.asarray(expected), err_msg=name)


def test_large_decodes_run_one_at_a_time(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(rkio, "LARGE_IMAGE_PIXELS", 100)  # 400 px counts as large here
    done = threading.Event()
    worker = threading.Thread(target=lambda: (read_image(tmp_path / "a.png"), done.set()))
    with rkio._LARGE_DECODE:  # another large decode is under way
        worker.start()
        assert not done.wait(0.3)
    worker.join(5)
    assert done.is_set()
    monkeypatch.setattr(rkio, "LARGE_IMAGE_PIXELS", 1000)
    with rkio._LARGE_DECODE:  # small images do not wait
        assert read_image(tmp_path / "a.png").shape == (20, 20, 3)


def test_list_images_names_every_entry_it_does_not_use(tmp_path):
    for rel in ("b.PNG", "a.jpg", "sub/c.webp", "sub/deeper/d.tif", ".cache/e.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / rel, format="PNG")
    (tmp_path / "readme.md").write_text("x")
    (tmp_path / "noext").write_text("x")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    os.symlink(tmp_path / "sub", tmp_path / "linked")
    files, skipped = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.tif",
    ]  # fmt: skip
    reasons = {p.relative_to(tmp_path).as_posix(): why for p, why in skipped}
    assert list(reasons) == sorted(reasons)
    assert reasons == {
        ".DS_Store": "hidden file",
        ".cache": "hidden folder, not searched",
        "dangling.png": f"broken symbolic link (to {tmp_path / 'missing.png'})",
        "linked": "link to a folder, not followed",
        "noext": reasons["noext"],
        "readme.md": reasons["readme.md"],
    }
    assert reasons["noext"].startswith("not an image file type (no suffix")
    assert reasons["readme.md"].startswith("not an image file type ('.md'")
    top, skipped_top = list_images(tmp_path, recursive=False)
    assert [p.name for p in top] == ["a.jpg", "b.PNG"]
    assert dict((p.name, w) for p, w in skipped_top)["sub"].startswith("a folder")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "a.jpg")


def test_load_images_takes_mixed_sizes_as_scoring_does(tmp_path):
    rng = np.random.default_rng(2)
    sizes = [(40, 40), (48, 36), (300, 200)]
    for i, (w, h) in enumerate(sizes):  # smooth pictures, as photos are
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        coarse.resize((w, h), Image.Resampling.BICUBIC).save(tmp_path / f"{i}.png")
    paths = [f"{i}.png" for i in range(3)]
    mixed = load_images(paths, tmp_path)
    assert mixed.shape == (3, 3, 36, 36) and mixed.dtype == torch.uint8
    fixed = load_images(paths, tmp_path, side=32)
    assert fixed.shape == (3, 3, 32, 32)
    # The 300 x 200 image was decoded reduced; it matches the full decode brought to 32 px.
    full = scorer_input(decode_image(tmp_path / "2.png"), 32).astype(np.float32)
    assert decode_image(tmp_path / "2.png", target_side=32).reduction == 3
    assert np.abs(fixed[2].permute(1, 2, 0).numpy() - full).mean() < 1
    same = load_images(["0.png", "0.png"], tmp_path)  # one size: kept as it is
    np.testing.assert_array_equal(same[0].permute(1, 2, 0).numpy(), read_image(tmp_path / "0.png"))
    with pytest.raises(FileNotFoundError, match="nope.png: image file not found"):
        load_images(["nope.png"], tmp_path)


# ---------------------------------------------------------------------------------------
# Every command on the hostile corpus: exit 0, every bad file named with its reason, every
# good file processed.


def test_score_on_the_hostile_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "scores.parquet"
    with pytest.warns(DomainWarning, match="embedded default models know only AdWorld") as seen:
        code = main(["score", "--input", str(corpus.folder), "--out", str(out), "--no-progress"])
    assert code == 0
    domain = [str(w.message) for w in seen if issubclass(w.category, DomainWarning)]
    assert len(domain) == 1  # once per run
    assert f"big_{BIG_SIDE}.png: {BIG_SIDE} x {BIG_SIDE} px" in domain[0]
    assert "--model DIR" in domain[0]
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored"] == len(corpus.good) and summary["skipped"] == len(corpus.bad)
    table = pq.read_table(out)
    assert sorted(table["path"].to_pylist()) == corpus.good
    report = json.loads((tmp_path / "scores.skipped.json").read_text())["skipped"]
    assert {s["path"] for s in report} == set(corpus.bad)
    for s in report:
        assert corpus.bad[s["path"]] in s["reason"], s
    scores = dict(zip(table["path"].to_pylist(), table["score"].to_pylist(), strict=True))
    eight, sixteen = corpus.grey_pair
    assert abs(scores[eight] - scores[sixteen]) < 0.01

    # The same files as a manifest with large_string columns (pandas 3, polars).
    manifest = tmp_path / "m.parquet"
    names = corpus.good + list(corpus.bad)
    paths = [os.path.relpath(corpus.folder / n, tmp_path) for n in names]
    pq.write_table(
        pa.table({"path": pa.array(paths, pa.large_string()),
                  "prompt": pa.array(["a mug"] * len(names), pa.large_string())}),
        manifest,
    )  # fmt: skip
    out2 = tmp_path / "scores2.parquet"
    with pytest.warns(DomainWarning):
        assert main(["score", "--input", str(manifest), "--out", str(out2), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bad_in_manifest = len(corpus.bad) - 1  # a manifest may name a hidden file: it is read
    assert summary["scored"] == len(corpus.good) + 1 and summary["skipped"] == bad_in_manifest


def test_inspect_on_the_hostile_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "verdicts.parquet"
    argv = ["inspect", "--input", str(corpus.folder), "--product", str(corpus.product),
            "--caption", "a mug, 20 cm", "--out", str(out)]  # fmt: skip
    with pytest.warns(DomainWarning, match="rewardkit train rfnet") as seen:
        assert main(argv) == 0
    assert len([w for w in seen if issubclass(w.category, DomainWarning)]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["inspected"] == len(corpus.good) and summary["skipped"] == len(corpus.bad)
    verdicts = pq.read_table(out)
    assert sorted(os.path.basename(p) for p in verdicts["path"].to_pylist()) == corpus.good
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("skipped: ")]
    for name, reason in corpus.bad.items():
        assert any(f"{corpus.folder / name}: " in ln and reason in ln for ln in lines), name
    report = json.loads((tmp_path / "verdicts.skipped.json").read_text())
    assert {os.path.basename(s["path"]) for s in report} == set(corpus.bad)


def test_world_label_on_the_hostile_corpus(corpus, tmp_path, capsys):
    manifest = write_label_manifest(corpus, corpus.folder.parent / "label.parquet")
    out = tmp_path / "oracle.parquet"
    assert main(["world", "label", "--manifest", str(manifest), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    table = pq.read_table(out).to_pylist()
    n_images = len(corpus.good) + len(corpus.bad)
    as_image, as_product = table[:n_images], table[n_images:]
    for row in as_image:
        name = os.path.basename(row["path"])
        if name in corpus.good or name == ".hidden.png":  # a manifest may name a hidden file
            assert row["error"] is None and row["oracle_label"] is not None, row
        else:
            expected = "not an image file" if name == "notes.txt" else corpus.bad[name]
            assert f"{name}: " in row["error"] and expected in row["error"], row
    for name, row in zip(corpus.bad, as_product, strict=True):
        if name == ".hidden.png":
            assert row["error"] is None
        else:
            assert f"{name}: " in row["error"] and row["oracle_label"] is None, row
    errors = [r["error"] for r in table if r["error"]]
    assert json.loads(captured.out)["skipped"] == len(errors) == 2 * (len(corpus.bad) - 1)
    for e in errors:
        assert f"skipped: {e}" in captured.err


def test_generate_on_the_hostile_corpus(corpus, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["generate", "--products", str(corpus.folder), "--out", str(out), "--limit", "50",
            "--prompt", "a product on a wooden table", "--steps", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["products"] == len(corpus.good)
    skipped = {os.path.basename(s["path"]): s["reason"] for s in stats["skipped"]}
    assert set(skipped) == set(corpus.bad)
    for name, reason in skipped.items():
        assert corpus.bad[name] in reason, (name, reason)
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == len(corpus.good)
    assert len(set(manifest["product_id"].to_pylist())) == len(corpus.good)  # photo.tif/.bmp/.gif
    for rel in manifest["path"].to_pylist():
        assert read_image(out / rel).shape == (64, 64, 3)


def test_rfnet_inputs_of_large_files_match_the_full_decode(tmp_path):
    rng = np.random.default_rng(4)
    coarse = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    coarse.resize((1200, 900), Image.Resampling.BICUBIC).save(tmp_path / "g.png")
    assert decode_image(tmp_path / "g.png", target_side=64).reduction == 7
    with Image.open(tmp_path / "g.png") as im:
        reference = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    got = load_resized(tmp_path / "g.png", 64)
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - reference).mean() < 0.5
    product = load_product_rgb(tmp_path / "g.png", 64)  # opaque photo: kept, padded square
    assert product.shape == (64, 64, 3) and (product[:4] == 255).all()  # white bands above


def test_list_images_reports_a_folder_it_cannot_read(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    scandir = os.scandir

    def refusing(path):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(rkio.os, "scandir", refusing)
    files, skipped = list_images(tmp_path)
    assert [p.name for p in files] == ["a.png"]
    assert skipped == [(tmp_path / "locked", "folder cannot be read (PermissionError: "
                        "Permission denied)")]  # fmt: skip


def test_float_images_are_scaled_as_a_whole_also_when_reduced(tmp_path, monkeypatch):
    ramp = np.linspace(0, 1, 300 * 400, dtype=np.float32).reshape(300, 400)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")  # F, values in [0, 1]
    wide = np.where(ramp < 0.5, ramp, ramp * 400 - 200)  # top half in [0, 0.5], then to 200
    Image.fromarray(wide.astype(np.float32)).save(tmp_path / "wide.tif")
    monkeypatch.setattr(rkio, "_STRIP_PIXELS", 4000)  # strips would each see part of it
    for name, top in (("unit.tif", 255), ("wide.tif", 200)):
        full = read_image(tmp_path / name, "L")
        assert full[0, 0] == 0 and full[-1, -1] == top
        reduced = read_image(tmp_path / name, "L", target_side=20)  # 300 // 40 = 7
        assert reduced.shape == (43, 58)
        expected = np.asarray(Image.fromarray(full).reduce(7), dtype=int)
        assert np.abs(reduced.astype(int) - expected).max() <= 1


def test_contrastive_training_takes_images_of_any_size_and_format(tmp_path, small_corpus):
    from rewardkit.training.reward import PretrainConfig, pretrain_contrastive
    from tests.models.test_social_reward import make_tiny_clip

    model = make_tiny_clip(tmp_path / "clip")
    rel = os.path.relpath(small_corpus.folder, tmp_path)
    names = small_corpus.good * 3  # 64-96 px, 16-bit, CMYK, palette, EXIF, TIFF/BMP/GIF
    rows = [{"path": f"{rel}/{n}", "prompt": ["a red cat", "a blue cat"][i % 2]}
            for i, n in enumerate(names)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    config = PretrainConfig(preset="all", batch_size=8, epochs=1, max_steps=2, lr=1e-3)
    result = pretrain_contrastive(
        model, tmp_path / "manifest.parquet", tmp_path / "run", config, progress=False
    )
    assert result.steps == 2 and (tmp_path / "run" / "model").is_dir()
