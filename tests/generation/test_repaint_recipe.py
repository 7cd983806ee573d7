"""recipes/repaint_renders.py: renders repainted by a generator (SDEdit) come out as a
generated set that ``world label`` and ``train rfnet`` read, resumable by id."""

import pyarrow.parquet as pq
import pytest

from rewardkit.cli import main
from tests.recipes import load_recipe


@pytest.fixture(scope="module")
def tiny_generator_dir(tmp_path_factory):
    from rewardkit.generation.default import build_generator
    from tests.generation.conftest import TINY

    folder = tmp_path_factory.mktemp("gen") / "g"
    build_generator(TINY, seed=0).save_pretrained(folder)
    return folder


def test_repainted_renders_are_a_labelled_generated_set(tmp_path, tiny_generator_dir, capsys):
    world = tmp_path / "w"
    assert main(["world", "render", "--out", str(world), "--n", "3", "--seed", "5",
                 "--size", "32"]) == 0  # fmt: skip
    recipe = load_recipe("repaint_renders")
    out = tmp_path / "g"
    argv = ["--renders", str(world), "--out", str(out), "--generator", str(tiny_generator_dir),
            "--strength", "0.5", "--steps", "4", "--seed", "1"]  # fmt: skip
    stats = recipe.main(argv)
    assert stats["images"] == 3 and stats["repainted_now"] == 3 and stats["steps"] == 4
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    source = pq.read_table(world / "manifest.parquet").to_pylist()
    assert [r["product_key"] for r in rows] == [r["product_key"] for r in source]
    assert all(r["strength"] == 0.5 and (out / r["path"]).is_file() for r in rows)
    again = recipe.main(argv)  # every image is there: nothing is painted twice
    assert again["repainted_now"] == 0
    labels = tmp_path / "l.parquet"
    assert main(["world", "label", "--manifest", str(out / "manifest.parquet"),
                 "--out", str(labels)]) == 0  # fmt: skip
    assert pq.read_table(labels).num_rows == 3


def test_a_world_at_another_size_is_named(tmp_path, tiny_generator_dir):
    world = tmp_path / "w"
    assert main(["world", "render", "--out", str(world), "--n", "1", "--seed", "5",
                 "--size", "48"]) == 0  # fmt: skip
    recipe = load_recipe("repaint_renders")
    with pytest.raises(SystemExit, match="48 px; the generator paints at 32 px"):
        recipe.main(["--renders", str(world), "--out", str(tmp_path / "g"),
                     "--generator", str(tiny_generator_dir)])  # fmt: skip
