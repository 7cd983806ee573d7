"""Training recipes on tiny dual encoders: they learn, resume exactly, refuse bad input."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from rewardkit.data.keys import prompt_key, read_training_keys
from rewardkit.io import write_png_atomic
from rewardkit.training.reward import (
    PretrainConfig,
    RewardTrainConfig,
    pretrain_contrastive,
    train_reward,
)
from tests.models.test_social_reward import make_tiny_clip


def _pairs_dataset(folder: Path, n_images: int = 24, n_pairs: int = 96) -> Path:
    """Bright images are preferred to dark ones: a preference a tiny model learns fast."""
    rng = np.random.default_rng(0)
    brightness = np.linspace(0.1, 0.9, n_images)
    for i, b in enumerate(brightness):
        img = np.clip(b * 255 + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
        write_png_atomic(folder / "images" / f"{i:03d}.png", img)
    rows = []
    for k in range(n_pairs):
        i, j = rng.choice(n_images, 2, replace=False)
        hi, lo = (i, j) if brightness[i] > brightness[j] else (j, i)
        rows.append(
            {
                "prompt": "a cat",
                "pos_path": f"images/{hi:03d}.png",
                "neg_path": f"images/{lo:03d}.png",
                "weight": 1.0,
                "split": "val" if k % 4 == 0 else "train",
            }
        )
    path = folder / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return make_tiny_clip(root / "clip"), _pairs_dataset(root / "data")


def test_train_reward_learns_the_preference(setup, tmp_path):
    model, pairs = setup
    config = RewardTrainConfig(preset="all", lr=3e-3, batch_size=16, epochs=6, margin=0.3)
    result = train_reward(model, pairs, tmp_path / "run", config, progress=False)
    assert result.steps == 6 * (72 // 16)
    assert result.history[0]["epoch"] == 1 and len(result.history) == 6
    assert result.metrics["val_pair_accuracy"] >= 0.9
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "train_summary.json").is_file()
    # The model records the prompts it trained and was validated on (held-out checks).
    keys = read_training_keys(tmp_path / "run" / "model")
    assert keys.prompts == {prompt_key("a cat"): "train"}


def test_resume_matches_an_uninterrupted_run(setup, tmp_path):
    model, pairs = setup
    base = dict(preset="paper", lr=1e-3, batch_size=16, epochs=3, checkpoint_every=2)
    straight = train_reward(model, pairs, tmp_path / "a", RewardTrainConfig(**base), progress=False)
    train_reward(model, pairs, tmp_path / "b", RewardTrainConfig(**base, max_steps=5), False)
    resumed = train_reward(model, pairs, tmp_path / "b", RewardTrainConfig(**base), False)
    assert resumed.resumed_from == 5 and resumed.steps == straight.steps
    # The curve too: the epoch the budget cut is resumed, not logged twice or in part.
    assert [(h["epoch"], h["step"]) for h in resumed.history] == [(1, 4), (2, 8), (3, 12)]
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in straight.history], rel=1e-6
    )
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # Frozen layers of the paper preset did not move.
    first = load_file(model / "model.safetensors")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(a[key], first[key], rtol=0, atol=0)


def test_checkpoint_with_other_settings_is_refused(setup, tmp_path):
    model, pairs = setup
    cfg = RewardTrainConfig(batch_size=16, epochs=1, max_steps=2, checkpoint_every=1)
    train_reward(model, pairs, tmp_path / "run", cfg, progress=False)
    other = RewardTrainConfig(batch_size=16, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="other settings"):
        train_reward(model, pairs, tmp_path / "run", other, progress=False)


def test_bad_input_names_file_and_field(setup, tmp_path):
    model, pairs = setup
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["x"], "pos_path": ["a.png"]}), bad)
    with pytest.raises(ValueError, match="bad.parquet: missing column"):
        train_reward(model, bad, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="loss"):
        RewardTrainConfig(loss="hinge")
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ValueError, match="c.yaml: unknown key"):
        RewardTrainConfig.from_yaml(yml)


def test_bradley_terry_loss_trains(setup, tmp_path):
    model, pairs = setup
    config = RewardTrainConfig(loss="bradley-terry", preset="all", lr=3e-3, batch_size=16,
                               epochs=4)  # fmt: skip
    result = train_reward(model, pairs, tmp_path / "run", config, progress=False)
    assert result.metrics["val_pair_accuracy"] >= 0.8


def test_pretrain_contrastive_retrieves_captions(tmp_path):
    model = make_tiny_clip(tmp_path / "clip")
    colours = {
        "a red cat": (220, 30, 30),
        "a blue cat": (30, 30, 220),
        "a green cat": (30, 200, 30),
    }
    rows, rng = [], np.random.default_rng(1)
    for i in range(150):
        text = list(colours)[i % 3]
        img = np.clip(np.array(colours[text]) + rng.normal(0, 15, (32, 32, 3)), 0, 255)
        write_png_atomic(tmp_path / "img" / f"{i}.png", img.astype(np.uint8))
        rows.append({"path": f"img/{i}.png", "prompt": text})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    config = PretrainConfig(preset="all", batch_size=16, epochs=4, lr=2e-3)
    result = pretrain_contrastive(
        model, tmp_path / "manifest.parquet", tmp_path / "run", config, progress=False
    )
    assert result.metrics["val_image_to_text_top1"] >= 0.9


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(2, 2)
        self.frozen = torch.nn.Linear(2, 1).requires_grad_(False)
        self.register_buffer("count", torch.zeros(1))


def _saved_tiny(folder: Path) -> tuple[_Tiny, torch.optim.Optimizer]:
    from rewardkit.training.loop import save_checkpoint

    torch.manual_seed(0)
    model = _Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.a(torch.ones(1, 3)).sum().backward()
    opt.step()
    model.count += 4
    save_checkpoint(folder, model, opt, {"step": 1, "history": [], "signature": {"k": 1}})
    return model, opt


def test_load_checkpoint_restores_exactly_the_trainable_state(tmp_path):
    from rewardkit.training.loop import load_checkpoint

    saved, _ = _saved_tiny(tmp_path / "ckpt")
    torch.manual_seed(1)
    fresh = _Tiny()
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    state = load_checkpoint(tmp_path / "ckpt", fresh, opt, {"k": 1})
    assert state["step"] == 1
    for name, value in saved.state_dict().items():
        same = torch.equal(value, fresh.state_dict()[name])
        assert same == (not name.startswith("frozen.")), name  # frozen weights are not saved
    assert len(opt.state) == 2  # the optimiser moments of a.weight and a.bias


def _rewrite(folder: Path, edit) -> None:
    from safetensors.torch import save_file

    weights = load_file(folder / "trainable.safetensors")
    edit(weights)
    save_file(weights, str(folder / "trainable.safetensors"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda w: w.pop("b.weight"), r"1 \(b\.weight\) missing, 0 extra"),
        (lambda w: w.pop("buffer:count"), r"1 \(buffer:count\) missing"),
        (lambda w: w.update({"c.weight": torch.zeros(2)}), r"0 missing, 1 \(c\.weight\) extra"),
        (lambda w: w.update({"frozen.bias": torch.zeros(1)}), r"1 \(frozen\.bias\) extra"),
        (
            lambda w: w.update({"a.bias": torch.zeros(1)}),
            r"shapes differ.*a\.bias \(1,\) vs \(2,\)",
        ),
    ],
)
def test_load_checkpoint_refuses_missing_extra_or_reshaped_parameters(tmp_path, edit, message):
    from rewardkit.training.loop import load_checkpoint

    folder = tmp_path / "ckpt"
    _saved_tiny(folder)
    _rewrite(folder, edit)
    torch.manual_seed(1)
    fresh = _Tiny()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match=rf"^{folder}: .*{message}"):
        load_checkpoint(folder, fresh, opt, {"k": 1})
    # Nothing was loaded partially.
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_resume_refuses_a_checkpoint_that_lacks_trainable_parameters(setup, tmp_path):
    model, pairs = setup
    cfg = RewardTrainConfig(preset="paper", batch_size=16, epochs=1, max_steps=1)
    train_reward(model, pairs, tmp_path / "run", cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoint"
    names = sorted(load_file(ckpt / "trainable.safetensors"))
    dropped = [n for n in names if n.startswith("model.vision_model.")]
    assert len(dropped) > 5
    _rewrite(ckpt, lambda w: [w.pop(n) for n in dropped])
    more = RewardTrainConfig(preset="paper", batch_size=16, epochs=1, max_steps=2)
    with pytest.raises(
        ValueError, match=rf"{ckpt}: .* {len(dropped)} \({dropped[0]}, .*, \.\.\.\) missing"
    ):
        train_reward(model, pairs, tmp_path / "run", more, progress=False)
