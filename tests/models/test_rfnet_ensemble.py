"""RFNetConfig.ensemble / RFNet.ensemble_of and recipes/rfnet_ensemble.py: several trained
inspectors read as one model whose class probabilities are the members' mean."""

import dataclasses
import json

import pytest
import torch

from rewardkit.data.keys import TrainingKeys, read_training_keys, write_training_keys
from rewardkit.models.inspector import Inspector
from rewardkit.models.rfnet import EARLY_MODALITIES, RFNet, RFNetConfig
from tests.recipes import load_recipe

TINY = RFNetConfig(fusion="early", modalities=EARLY_MODALITIES, width=8, resolution=32,
                   accept_threshold=0.4)  # fmt: skip


def _inputs(n: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"product": torch.rand(n, 3, 32, 32, generator=g),
            "generated": torch.rand(n, 3, 32, 32, generator=g),
            "placed": torch.rand(n, 4, 32, 32, generator=g),
            "height_cm": torch.tensor([10.0, 40.0, 90.0][:n])}  # fmt: skip


def _members(k: int = 3) -> list[RFNet]:
    out = []
    for seed in range(k):
        torch.manual_seed(seed)
        out.append(RFNet(TINY).eval())
    return out


def test_the_ensemble_is_the_mean_of_its_members_probabilities(tmp_path):
    members = _members()
    ens = RFNet.ensemble_of(members, accept_threshold=0.55)
    assert ens.config.ensemble == 3 and ens.config.accept_threshold == 0.55
    assert ens.config.loop_threshold is None
    x = _inputs()
    with torch.no_grad():
        mean = torch.stack([m(**x).softmax(-1) for m in members]).mean(0)
        assert torch.allclose(ens(**x).softmax(-1), mean, atol=1e-6)
        # Members differ, so the mean is not any one of them.
        assert not torch.allclose(members[0](**x).softmax(-1), mean, atol=1e-3)
    # P(Available) is the reward: it reaches the pixels through every member.
    gen = x["generated"].clone().requires_grad_(True)
    ens.available_log_prob(**dict(x, generated=gen)).sum().backward()
    assert gen.grad.abs().sum() > 0
    ens.save_pretrained(tmp_path / "ens")
    loaded = RFNet.from_pretrained(tmp_path / "ens")
    assert loaded.config == ens.config
    with torch.no_grad():
        assert torch.allclose(loaded(**x), ens(**x), atol=1e-6)
    inspector = Inspector.from_pretrained(tmp_path / "ens")
    assert inspector.accept_threshold == 0.55
    probs = loaded(**x).softmax(-1)
    assert inspector.verdicts(probs) == [
        "Available" if p >= 0.55 else inspector.classes[1 + int(q[1:].argmax())]
        for p, q in zip(probs[:, 0].tolist(), probs, strict=True)
    ]


def test_members_must_share_one_architecture():
    a, b = _members(2)
    with pytest.raises(ValueError, match="needs >= 2 models"):
        RFNet.ensemble_of([a])
    wide = RFNet(dataclasses.replace(TINY, width=16))
    with pytest.raises(ValueError, match=r"model 1 differs from model 0 in \['width'\]"):
        RFNet.ensemble_of([a, wide])
    # Operating points may differ (the ensemble gets its own).
    other = RFNet(dataclasses.replace(TINY, accept_threshold=0.9, loop_threshold=0.95))
    assert RFNet.ensemble_of([a, other]).config.accept_threshold is None
    with pytest.raises(ValueError, match="is an ensemble"):
        RFNet.ensemble_of([RFNet.ensemble_of([a, b]), a])
    with pytest.raises(ValueError, match="ensemble: the number of networks"):
        RFNetConfig(ensemble=0)
    with pytest.raises(ValueError, match="no measurement heads"):
        dataclasses.replace(TINY, ensemble=2, measurements=("contact_gap",))


def test_recipe_writes_the_ensemble_and_the_union_of_training_keys(tmp_path, capsys):
    recipe = load_recipe("rfnet_ensemble")
    folders = []
    for i, m in enumerate(_members(2)):
        folder = m.save_pretrained(tmp_path / f"m{i}")
        keys = TrainingKeys()
        keys.add("product", [f"p{i}", "shared"], "train")
        write_training_keys(folder, keys)
        folders.append(folder)
    recipe.main(["--member", *map(str, folders), "--out", str(tmp_path / "ens")])
    printed = json.loads(capsys.readouterr().out)
    assert printed["accept_threshold"] == 0.4 and printed["training_keys"] == 3
    ens = RFNet.from_pretrained(tmp_path / "ens")
    assert ens.config.ensemble == 2 and ens.config.accept_threshold == 0.4
    assert set(read_training_keys(tmp_path / "ens").products) == {"p0", "p1", "shared"}
    (folders[1] / "inspector.json").write_text("{}")
    with pytest.raises(SystemExit, match="inspector.json"):
        recipe.main(["--member", *map(str, folders), "--out", str(tmp_path / "e2")])
    wide = RFNet(dataclasses.replace(TINY, width=16)).save_pretrained(tmp_path / "wide")
    with pytest.raises(SystemExit, match="--member: ensemble_of: model 1 differs"):
        recipe.main(["--member", str(folders[0]), str(wide), "--out", str(tmp_path / "e3")])
