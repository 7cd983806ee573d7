"""recipes/scale_prompts.py: each prompt gains the product's scale digit, computed from its
placed height and real height; every other column is kept."""

import math

import pyarrow.parquet as pq

from rewardkit.world.export import render_world
from tests.recipes import load_recipe


def test_prompts_gain_the_scale_digit(tmp_path):
    render_world(tmp_path / "w", n=6, seed=2, size=64, progress=False)
    src, dst = tmp_path / "w" / "manifest.parquet", tmp_path / "w" / "scaled.parquet"
    load_recipe("scale_prompts").main(str(src), str(dst))
    before, after = pq.read_table(src), pq.read_table(dst)
    assert after.column_names == before.column_names and after.num_rows == 6
    for old, new in zip(before.to_pylist(), after.to_pylist(), strict=True):
        px_per_cm = (old["y1"] - old["y0"]) / old["product_height_cm"]
        digit = min(9, max(0, round(2 * (math.log2(px_per_cm) + 3))))
        assert new["prompt"] == f"scale {digit}, {old['prompt']}"
        assert {k: v for k, v in new.items() if k != "prompt"} == {
            k: v for k, v in old.items() if k != "prompt"
        }
