"""Recipe (a diagnostic, not part of the library): prefix each prompt of a render manifest
with the product's scale on the canvas, "scale D", D = round(2 (log2(px per cm) + 3))
clipped to 0-9 (steps of 0.5 in log2), px the product's placed height (y1 - y0).

    python recipes/scale_prompts.py train/manifest.parquet train/manifest_scale.parquet

Write the copy beside the original (its paths are relative to the manifest's folder)."""

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main(src: str, dst: str) -> None:
    t = pq.read_table(src)
    px = np.asarray(t["y1"].to_pylist(), float) - np.asarray(t["y0"].to_pylist(), float)
    cm = np.asarray(t["product_height_cm"].to_pylist(), float)
    d = np.clip(np.round(2 * (np.log2(px / cm) + 3)), 0, 9).astype(int)
    prompts = [f"scale {k}, {p}" for k, p in zip(d, t["prompt"].to_pylist(), strict=True)]
    t = t.set_column(t.column_names.index("prompt"), "prompt", pa.array(prompts))
    pq.write_table(t, dst)
    print(np.bincount(d, minlength=10).tolist())


if __name__ == "__main__":
    main(*sys.argv[1:3])
