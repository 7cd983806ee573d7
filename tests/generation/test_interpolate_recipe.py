"""recipes/interpolate_generator.py: a fine-tuned generator's own components mixed toward its
base tensor by tensor (alpha 0 = base, 1 = fine-tuned), written as a folder that loads."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rewardkit.generation.pipeline import component_folders
from tests.recipes import load_recipe

W = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base_and_tuned(tmp_path_factory):
    from rewardkit.generation.default import build_generator
    from tests.generation.conftest import TINY

    root = tmp_path_factory.mktemp("interp")
    build_generator(TINY, seed=0).save_pretrained(root / "base")
    tuned = root / "run" / "model"
    (tuned / "controlnet").mkdir(parents=True)
    (tuned / "controlnet" / "config.json").write_bytes(
        (root / "base" / "controlnet" / "config.json").read_bytes()
    )
    g = torch.Generator().manual_seed(1)
    weights = {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in load_file(str(root / "base" / "controlnet" / W)).items()}  # fmt: skip
    save_file(weights, str(tuned / "controlnet" / W))
    (tuned / "rewardkit_generator.json").write_text(json.dumps({"base": "../../base"}))
    return root / "base", tuned


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5])
def test_each_tensor_is_base_plus_alpha_times_the_change(tmp_path, base_and_tuned, alpha):
    base, tuned = base_and_tuned
    out = tmp_path / "deep" / "mixed"
    load_recipe("interpolate_generator").main(
        ["--tuned", str(tuned), "--alpha", str(alpha), "--out", str(out)]
    )
    b, t = load_file(str(base / "controlnet" / W)), load_file(str(tuned / "controlnet" / W))
    m = load_file(str(out / "controlnet" / W))
    assert set(m) == set(b)
    for k in b:
        torch.testing.assert_close(m[k], b[k] + alpha * (t[k] - b[k]))
    where = component_folders(out)  # loads: own ControlNet, the rest from the same base
    assert where["controlnet"] == (out / "controlnet").resolve()
    assert where["unet"] == (base / "unet").resolve()
    record = json.loads((out / "interpolation.json").read_text())
    assert record["alpha"] == alpha and record["components"] == ["controlnet"]
    assert not (out.parent / "mixed.tmp").exists()


def test_a_tensor_of_another_shape_is_refused_by_name(tmp_path, base_and_tuned):
    base, tuned = base_and_tuned
    bad = tmp_path / "run" / "model"
    (bad / "controlnet").mkdir(parents=True)
    (bad / "controlnet" / "config.json").write_bytes(
        (tuned / "controlnet" / "config.json").read_bytes()
    )
    weights = load_file(str(tuned / "controlnet" / W))
    name = sorted(k for k, v in weights.items() if v.ndim == 4)[0]
    weights[name] = torch.zeros(1, 1, 1, 1)
    save_file(weights, str(bad / "controlnet" / W))
    (bad / "rewardkit_generator.json").write_text(json.dumps({"base": str(base)}))
    with pytest.raises(SystemExit, match=name.replace(".", r"\.")):
        load_recipe("interpolate_generator").main(
            ["--tuned", str(bad), "--alpha", "0.5", "--out", str(tmp_path / "o")]
        )
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.tmp").exists()
