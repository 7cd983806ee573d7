"""Product and prompt identities, the held-out check, and outputs that never collide."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from rewardkit.data.keys import (
    OverlapError,
    TrainingKeys,
    check_held_out,
    manifest_keys,
    product_key,
    prompt_key,
    read_training_keys,
    write_training_keys,
)
from rewardkit.io import write_png_atomic
from rewardkit.world.export import render_world
from rewardkit.world.products import render_cutout, sample_product


def _photo(seed: int) -> np.ndarray:
    return render_cutout(sample_product(np.random.default_rng(seed), f"k{seed}"), 64)


def test_product_key_is_content_and_height():
    a = _photo(0)
    assert product_key(a, 10.0) == product_key(a.copy(), 10.04)  # whole cm, as captions give it
    assert product_key(a, 10.0) != product_key(a, 12.0)
    assert product_key(a, None) == product_key(a, float("nan")) != product_key(a, 10.0)
    assert product_key(a, 10.0) != product_key(_photo(1), 10.0)
    # Colour under full transparency is not part of the product.
    b = a.copy()
    b[b[..., 3] == 0, :3] = 77
    assert product_key(b, 10.0) == product_key(a, 10.0)
    with pytest.raises(ValueError, match="uint8"):
        product_key(a[..., :3], 10.0)


def test_prompt_key_normalises_case_and_space():
    assert prompt_key("A red mug  on a table") == prompt_key(" a red mug on a TABLE\n")
    assert prompt_key("a red mug") != prompt_key("a blue mug")


def test_renders_carry_keys_and_one_seed_shares_products_across_balances(tmp_path):
    a = render_world(tmp_path / "a", 6, seed=5, size=32, progress=False)
    b = render_world(tmp_path / "b", 6, seed=5, size=32, balance="Available=1", progress=False)
    keys, prompts = manifest_keys(tmp_path / "a" / "manifest.parquet")
    assert keys == a["product_key"].to_pylist()  # the column is what the files say
    assert [prompt_key(p) for p in prompts] == a["prompt_key"].to_pylist()
    shared = set(a["product_key"].to_pylist()) & set(b["product_key"].to_pylist())
    assert shared  # other balance, same products: the file names cannot tell this


def test_check_held_out_counts_refuses_and_allows(tmp_path):
    seen = TrainingKeys()
    seen.add("product", ["p1", "p2"], "train")
    seen.add("product", ["p3"], "selection")
    seen.add_prompts(["a mug"], "train")
    write_training_keys(tmp_path / "m", seen)
    with pytest.raises(OverlapError, match=r"2 of 3 products were seen by m \(2\)"):
        check_held_out({"m": tmp_path / "m"}, ["p1", "p3", "p9"], where="x", quiet=True)
    o = check_held_out({"m": tmp_path / "m", "user": tmp_path / "none"}, ["p1", "p9", None],
                       prompts=["A MUG", "b", None], allow_overlap=True, quiet=True)  # fmt: skip
    assert (o.rows, o.seen_rows, o.prompt_rows, o.unknown) == (2, 1, 1, ["user"])
    assert o.to_dict()["share"] == 0.5
    clean = check_held_out({"m": tmp_path / "m"}, ["p8", "p9"], quiet=True)
    assert clean.seen_rows == 0
    by_prompt = check_held_out({"m": tmp_path / "m"}, prompts=["a  mug", "new"], kind="prompt",
                               allow_overlap=True, quiet=True)  # fmt: skip
    assert by_prompt.seen_rows == 1


def test_a_fine_tuned_model_inherits_its_base_keys(tmp_path):
    base = TrainingKeys()
    base.add("product", ["b1"], "train")
    write_training_keys(tmp_path / "gen", base)
    tuned = TrainingKeys()
    tuned.add("product", ["t1"], "selection")
    write_training_keys(tmp_path / "run" / "model", tuned)
    (tmp_path / "run" / "model" / "rewardkit_generator.json").write_text(
        json.dumps({"base": "../../gen"})
    )
    keys = read_training_keys(tmp_path / "run" / "model")
    assert keys.products == {"t1": "selection", "b1": "train"}


def test_generate_writes_one_output_per_product_when_names_repeat(tmp_path, tiny_generator_dir):
    # Two folders, each with a 000000.png of a different product.
    rows = []
    for k in range(2):
        write_png_atomic(tmp_path / f"shop{k}" / "000000.png", _photo(k))
        rows.append({"product_path": f"shop{k}/000000.png", "prompt": "a mug on a table",
                     "caption": "mug, 10 cm", "product_height_cm": 10.0})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "products.parquet")
    out = tmp_path / "gen"
    argv = ["generate", "--products", str(tmp_path / "products.parquet"), "--out", str(out),
            "--generator", str(tiny_generator_dir), "--steps", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    m = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(m) == 2 and len({r["path"] for r in m}) == 2
    assert len({r["product_key"] for r in m}) == 2
    assert len(list((out / "images").glob("*.png"))) == 2
    assert len(list((out / "products").glob("*.png"))) == 2
    for r in m:  # each output names the product it was generated for
        keys, _ = manifest_keys(out / "manifest.parquet")
        assert r["product_key"] in keys


@pytest.fixture(scope="module")
def tiny_generator_dir(tmp_path_factory):
    from rewardkit.generation.default import build_generator
    from tests.generation.conftest import TINY

    folder = tmp_path_factory.mktemp("gen") / "g"
    build_generator(TINY, seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["score", "--input", "IN", "--out", "OUT/x.csv"], "writes .parquet"),
        (["score", "--input", "IN", "--out", "OUT"], "is a folder"),
        (["world", "render", "--n", "2", "--out", "OUT/file.txt"], "is a file"),
        (["eval", "rfnet", "--manifest", "IN", "--out", "OUT/x.parquet"], "writes .json"),
        (["score", "--input", "IN", "--out", "OUT/s.parquet", "--device", "cuda:7"], "--device"),
        (["score", "--input", "IN", "--out", "OUT/s.parquet", "--device", "tpu9"], "--device"),
    ],
)
def test_cli_checks_out_and_device_before_work(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("IN", str(tmp_path / "in")).replace("OUT", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_ctrl_c_is_one_line(monkeypatch, tmp_path, capsys):
    import rewardkit.world.export as export

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "render_world", interrupted)
    assert main(["world", "render", "--n", "2", "--out", str(tmp_path / "w")]) == 130
    assert capsys.readouterr().err.strip() == "rewardkit: interrupted; the same command resumes"
