"""recipes/interpolate_generator.py: a fine-tuned generator's own components mixed toward its
base tensor by tensor (alpha 0 = base, 1 = fine-tuned), written as a folder that loads."""

import json
import shutil

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


def test_several_tuned_folders_make_their_mean_and_the_union_of_their_keys(
    tmp_path, base_and_tuned
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, tuned = base_and_tuned
    other = tmp_path / "run2" / "model"
    (other / "controlnet").mkdir(parents=True)
    (other / "controlnet" / "config.json").write_bytes(
        (tuned / "controlnet" / "config.json").read_bytes()
    )
    g = torch.Generator().manual_seed(2)
    weights = {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in load_file(str(base / "controlnet" / W)).items()}  # fmt: skip
    save_file(weights, str(other / "controlnet" / W))
    (other / "rewardkit_generator.json").write_text(json.dumps({"base": str(base)}))
    # Two members' keys, one row shared, one side written as large_string (pandas 3 / polars).
    keys = tmp_path / "keys"
    keys.mkdir()
    pq.write_table(pa.table({"kind": ["product", "product"], "key": ["b", "a"],
                             "role": ["train", "train"]}), keys / "one.parquet")  # fmt: skip
    big = pa.large_string()
    pq.write_table(pa.table({"kind": pa.array(["product", "prompt"], big),
                             "key": pa.array(["a", "c"], big),
                             "role": pa.array(["train", "train"], big)}),
                   other / "training_keys.parquet")  # fmt: skip
    first = tmp_path / "first"
    shutil.copytree(tuned, first)  # the module's tuned folder, with keys of its own, untouched
    card = json.loads((first / "rewardkit_generator.json").read_text())
    card["base"] = str(base)
    (first / "rewardkit_generator.json").write_text(json.dumps(card))
    (first / "training_keys.parquet").write_bytes((keys / "one.parquet").read_bytes())

    out = tmp_path / "soup"
    load_recipe("interpolate_generator").main(
        ["--tuned", str(first), str(other), "--alpha", "1", "--out", str(out)]
    )
    a, b = load_file(str(first / "controlnet" / W)), load_file(str(other / "controlnet" / W))
    m = load_file(str(out / "controlnet" / W))
    for k in m:
        if m[k].is_floating_point():
            torch.testing.assert_close(m[k], (a[k] + b[k]) / 2)
    rows = pq.read_table(out / "training_keys.parquet").to_pylist()
    assert [(r["kind"], r["key"]) for r in rows] == [
        ("product", "a"), ("product", "b"), ("prompt", "c")
    ]  # fmt: skip
    assert len(json.loads((out / "interpolation.json").read_text())["tuned"]) == 2
    component_folders(out)


def test_soup_members_with_different_bases_are_refused(tmp_path, base_and_tuned):
    base, tuned = base_and_tuned
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / "rewardkit_generator.json").write_text(json.dumps({"base": str(tmp_path)}))
    (elsewhere / "controlnet").mkdir()
    (elsewhere / "controlnet" / W).write_bytes((tuned / "controlnet" / W).read_bytes())
    with pytest.raises(SystemExit, match="base"):
        load_recipe("interpolate_generator").main(
            ["--tuned", str(tuned), str(elsewhere), "--alpha", "1", "--out", str(tmp_path / "o")]
        )
    assert not (tmp_path / "o").exists()
