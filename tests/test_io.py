"""Strict JSON: what rewardkit writes parses with a parser that rejects NaN and Infinity."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardkit.io import json_safe, to_strict_json, write_json_atomic


def _strict_load(text: str):
    """json.loads that refuses the NaN/Infinity literals Python writes by default."""

    def refuse(token: str):
        raise ValueError(f"invalid JSON literal {token}")

    return json.loads(text, parse_constant=refuse)


@dataclass
class _Figures:
    rate: float
    path: Path


NASTY = {
    "loss": float("nan"),
    "inf": float("inf"),
    "neg_inf": -math.inf,
    "np_nan": np.float32("nan"),
    "np64_inf": np.float64("-inf"),
    "ok": np.float32(0.5),
    "count": np.int64(3),
    "flag": np.bool_(True),
    "nested": [{"a": [1.0, float("nan"), (np.float16("inf"), 2)]}],
    "array": np.array([1.0, np.nan, 3.0]),
    "tensor": torch.tensor([0.25, float("nan")]),
    "scalar_tensor": torch.tensor(float("inf")),
    "path": Path("/a/b"),
    "figures": _Figures(rate=float("nan"), path=Path("x")),
    "set": {1},
    np.int64(7): "numpy key",
}


def test_json_safe_turns_every_non_finite_float_into_none():
    safe = json_safe(NASTY)
    assert safe["loss"] is None and safe["inf"] is None and safe["neg_inf"] is None
    assert safe["np_nan"] is None and safe["np64_inf"] is None
    assert safe["ok"] == 0.5 and type(safe["ok"]) is float
    assert safe["count"] == 3 and type(safe["count"]) is int
    assert safe["flag"] is True
    assert safe["nested"] == [{"a": [1.0, None, [None, 2]]}]
    assert safe["array"] == [1.0, None, 3.0]
    assert safe["tensor"] == [0.25, None] and safe["scalar_tensor"] is None
    assert safe["path"] == "/a/b"
    assert safe["figures"] == {"rate": None, "path": "x"}
    assert safe["set"] == [1] and safe["7"] == "numpy key"


def test_write_json_atomic_writes_strict_json(tmp_path):
    path = tmp_path / "stats.json"
    write_json_atomic(path, NASTY)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = _strict_load(text)
    assert loaded["loss"] is None and loaded["nested"] == [{"a": [1.0, None, [None, 2]]}]
    assert loaded["7"] == "numpy key"
    # Finite values are written exactly as before.
    write_json_atomic(path, {"b": 1.5, "a": [1, "x", None]})
    assert path.read_text() == json.dumps({"a": [1, "x", None], "b": 1.5}, indent=2) + "\n"


def test_to_strict_json_for_cli_output():
    line = to_strict_json({"rate": np.float32(0.25), "bad": float("nan")})
    assert _strict_load(line) == {"rate": 0.25, "bad": None}
    assert "\n" not in line
    assert to_strict_json({"b": 1, "a": 2}, sort_keys=True) == '{"a": 2, "b": 1}'


def test_unserialisable_values_still_raise(tmp_path):
    with pytest.raises(TypeError, match="object"):
        to_strict_json({"x": object()})
    with pytest.raises(TypeError, match="key"):
        to_strict_json({(1, 2): "tuple key"})
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "x.json", {"x": object()})
    assert not (tmp_path / "x.json").exists()


def test_recover_dir_puts_back_the_old_copy_a_killed_replace_left(tmp_path):
    """A writer killed between moving the old folder aside and moving the new one in leaves
    no folder: recover_dir restores the newest old copy and clears the other leftovers."""
    import time

    from rewardkit.io import recover_dir

    dst = tmp_path / "checkpoint"
    older = tmp_path / ".checkpoint.old-1-aaaa"
    older.mkdir()
    (older / "state.json").write_text("1")
    time.sleep(0.01)
    newer = tmp_path / ".checkpoint.old-2-bbbb"
    newer.mkdir()
    (newer / "state.json").write_text("2")
    half = tmp_path / ".checkpoint.x1y2"  # a temp folder of write_folder_atomic
    half.mkdir()
    recover_dir(dst)
    assert (dst / "state.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    recover_dir(dst)  # nothing to do: dst is kept
    assert (dst / "state.json").read_text() == "2"
