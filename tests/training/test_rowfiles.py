"""build_keyed_folder: the one way every training cache folder is made."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from rewardkit.training.rowfiles import RowArray, RowWriter, build_keyed_folder


def _writer(calls: list):
    def build(building):
        calls.append(building)
        w = RowWriter(building / "rows.npy", (3, 2), np.int16)
        w.append(np.arange(6, dtype=np.int16).reshape(3, 2))
        w.close()
        return {"rows": 3}

    return build


def test_built_once_per_key_and_rebuilt_when_the_key_changes(tmp_path):
    folder, calls = tmp_path / "cache", []
    meta = build_keyed_folder(folder, {"k": 1}, _writer(calls), main=True)
    assert meta == {"rows": 3, "key": {"k": 1}} and len(calls) == 1
    assert RowArray(folder / "rows.npy")[[2]].tolist() == [[4, 5]]
    assert build_keyed_folder(folder, {"k": 1}, _writer(calls), main=True)["rows"] == 3
    assert len(calls) == 1  # reused
    build_keyed_folder(folder, {"k": 2}, _writer(calls), main=True)
    assert len(calls) == 2
    assert json.loads((folder / "meta.json").read_text())["key"] == {"k": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no building folder left


def test_a_failed_build_leaves_nothing_and_the_old_folder_stays(tmp_path):
    folder = tmp_path / "cache"
    build_keyed_folder(folder, "a", _writer([]), main=True)

    def broken(building):
        (building / "half.npy").write_bytes(b"x")
        raise ValueError("row 7: unreadable")

    with pytest.raises(ValueError, match="row 7"):
        build_keyed_folder(folder, "b", broken, main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    assert json.loads((folder / "meta.json").read_text())["key"] == "a"


def test_a_killed_build_is_removed_and_other_processes_wait(tmp_path):
    folder = tmp_path / "cache"
    stale = tmp_path / ".cache.building-999999999"  # no such process
    stale.mkdir()
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append(build_keyed_folder(folder, "k", None, main=False, poll_s=0.05))
    )
    waiter.start()
    build_keyed_folder(folder, "k", _writer([]), main=True)
    waiter.join(timeout=10)
    assert got == [{"rows": 3, "key": "k"}]
    assert not stale.exists()
