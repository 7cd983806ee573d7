"""Reading ahead in DataLoader processes: order kept, the same results as in-process reads."""

import os

import numpy as np
import pyarrow as pa

from rewardkit.loading import read_ahead


def _load(item: int) -> tuple[int, int]:
    return item * item, os.getpid()


def test_results_come_in_order_from_other_processes():
    items = list(range(23))
    ahead = list(read_ahead(_load, items, workers=2))
    assert [r for r, _ in ahead] == [i * i for i in items]
    assert {pid for _, pid in ahead} - {os.getpid()}  # decoded elsewhere
    inline = list(read_ahead(_load, items, workers=0))
    assert {pid for _, pid in inline} == {os.getpid()}


def test_inspect_with_loader_processes_matches_inspecting_in_process(tmp_path):
    """Verdicts, probabilities and skipped rows are those of decoding in the process."""
    import pyarrow.parquet as pq
    import torch

    from rewardkit.commands.inspect import inspect_images
    from rewardkit.io import write_png_atomic
    from rewardkit.models.inspector import Inspector
    from rewardkit.models.rfnet import RFNet
    from tests.models.test_rfnet import tiny_config

    torch.manual_seed(0)
    config = tiny_config(modalities=("product", "generated"))
    inspector = Inspector(RFNet(config).eval()).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(9):
        write_png_atomic(tmp_path / f"g{i}.png", rng.integers(0, 255, (40, 40, 3), np.uint8))
        paths.append(str(tmp_path / f"g{i}.png"))
    write_png_atomic(tmp_path / "p.png", rng.integers(0, 255, (30, 30, 4), np.uint8))
    (tmp_path / "g4.png").write_bytes(b"broken")
    rows = pa.table({
        "path": paths, "product_path": [str(tmp_path / "p.png")] * 9,
        "caption": ["mug, 10 cm"] * 9,
    })  # fmt: skip
    a = inspect_images(inspector, rows, tmp_path / "a.parquet", 4, False, workers=0)
    b = inspect_images(inspector, rows, tmp_path / "b.parquet", 4, False, workers=2)
    assert a.skipped == b.skipped and len(a.skipped) == 1 and a.skipped[0]["row"] == 4
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
