"""recipes/prop_size_reward.py: labels match the oracle's geometry, the judge learns and passes
gradients to the image (it is used as a reward)."""

import math

import pyarrow.parquet as pq
import torch

from rewardkit.world.export import render_world
from tests.recipes import load_recipe


def test_prompt_kind():
    r = load_recipe("prop_size_reward")
    assert r.prompt_kind("a red mug on a table, next to a soda can, warm light") == "soda can"
    assert r.prompt_kind("a red mug on a table, next to a floor lamp") == "floor lamp"
    assert r.prompt_kind("a red mug on a table, in front of a wall") is None


def test_label_train_and_gradient(tmp_path):
    r = load_recipe("prop_size_reward")
    render_world(tmp_path / "w", n=24, seed=5, size=64, balance="Available=1", progress=False)
    out = tmp_path / "lab.parquet"
    r.cmd_label([str(tmp_path / "w" / "manifest.parquet")], str(out))
    rows = pq.read_table(out).to_pylist()
    assert rows and all(r.prompt_kind(x["prompt"]) == x["kind"] for x in rows)
    measured = [x for x in rows if math.isfinite(x["log_ratio"])]
    assert measured, "Available renders with a prop: the oracle measures it"
    for x in measured:  # Available renders: the prop is within the oracle's threshold
        expected = math.log2(r.PROPS[x["kind"]][0] / x["cm"])
        assert abs(x["log_ratio"] - expected - x["scale_error"]) < 1e-6
        assert abs(x["scale_error"]) <= 0.45

    r.cmd_train([str(out)], str(out), str(tmp_path / "judge"), epochs=1, lr=1e-3, seed=0)
    judge = r.SizeJudge()
    judge.load_state_dict(torch.load(tmp_path / "judge" / "size_judge.pt"))
    img, mask, kind, _ = r.load_set([str(out)])
    img = img[:2].clone().requires_grad_(True)
    judge(img, mask[:2], kind[:2]).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
