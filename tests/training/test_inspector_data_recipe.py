"""recipes/inspector_generated_data.sh: the commands that draw issue 23's labelled sets again,
checked against the worlds recipes/shipped_training_keys.py records for the shipped rfnet."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _dry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(RECIPES / "inspector_generated_data.sh"), "OUT", *args],
        env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_every_set_but_test_is_recorded_in_rfnet_training_keys():
    out = _dry()
    assert out.returncode == 0, out.stderr
    worlds = {int(s) for s in re.findall(r"world render .*?--seed (\d+)", out.stdout)}
    assert len(worlds) == 13
    source = (RECIPES / "shipped_training_keys.py").read_text()
    recorded = {int(s) for s in re.findall(r"^I23_\w+ = \((\d+),", source, re.M)}
    tests = {23777, 23888, 23889, 23901, 23902, 23903}
    assert worlds - recorded == tests  # the test products, and nothing else, are unrecorded
    assert not any(str(seed) in source for seed in tests)


def test_a_named_set_prints_its_three_commands_and_an_unknown_name_fails_first():
    out = _dry("TEST")
    lines = out.stdout.strip().splitlines()
    assert [ln.split()[1:3] for ln in lines] == [["world", "render"], ["generate", "--products"],
                                                 ["world", "label"]]  # fmt: skip
    assert "--seed 23777" in lines[0] and "--seed 14" in lines[1]
    bad = _dry("TEST", "NOPE")
    assert bad.returncode == 2 and bad.stdout == "" and "unknown set NOPE" in bad.stderr
