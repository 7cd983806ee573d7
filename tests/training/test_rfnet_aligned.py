"""Early fusion of aligned inputs (``RFNetConfig.aligned``, issue 23): config, the network,
its data (in memory and on disk), training, and every consumer of an inspector (inspect,
eval, Recurrent Generation's judge, the RFFT objective)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from rewardkit.cli import main
from rewardkit.data.samples import load_adworld_manifest, split_by_product
from rewardkit.models.inspector import Inspector
from rewardkit.models.rfnet import EARLY_MODALITIES, RFNet, RFNetConfig
from rewardkit.training.inspection_store import prepare_inspection_store
from rewardkit.training.rfnet import (
    EARLY_VARIANTS,
    RFNetTrainConfig,
    predict_rfnet,
    prepare_inspection_data,
    train_rfnet,
)
from rewardkit.world.export import load_product_photo
from rewardkit.world.placement import place_product, placed_on_white

TINY_EARLY = dict(fusion="early", modalities=list(EARLY_MODALITIES), width=8, resolution=32)


def test_config_preset_and_validation(tmp_path):
    c = RFNetConfig.aligned()
    assert c.fusion == "early" and c.modalities == EARLY_MODALITIES
    assert RFNetConfig().fusion == "late"  # the paper's RFNet stays the default
    with pytest.raises(ValueError, match="need fusion: early"):
        RFNetConfig(modalities=("generated", "placed"))
    with pytest.raises(ValueError, match="early fusion needs 'generated'"):
        RFNetConfig(fusion="early", modalities=("product", "placed"))
    with pytest.raises(ValueError, match="with fusion 'early'"):
        RFNetConfig(fusion="early", modalities=("generated", "depth"))
    with pytest.raises(ValueError, match="fusion: one of"):
        RFNetConfig(fusion="middle")
    model = RFNet(RFNetConfig(**TINY_EARLY))
    model.save_pretrained(tmp_path / "m")
    loaded = RFNet.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    x = {"product": torch.rand(2, 3, 32, 32), "generated": torch.rand(2, 3, 48, 48),
         "placed": torch.rand(2, 4, 32, 32), "height_cm": torch.tensor([10.0, 80.0])}  # fmt: skip
    model.eval()
    assert torch.allclose(model(**x), loaded(**x), atol=1e-6)


def test_a_strided_stem_sees_every_pixel_at_a_quarter_of_the_cost(tmp_path):
    # stem_stride 2 at 64 px: the scene CNN's first features are 32 x 32 (a 32-px model's
    # grid), yet the verdict still depends on single pixels of the 64-px image.
    with pytest.raises(ValueError, match="stem_stride: 1 or 2"):
        RFNetConfig(**TINY_EARLY, stem_stride=3)
    with pytest.raises(ValueError, match="needs fusion: early"):
        RFNetConfig(stem_stride=2)
    config = RFNetConfig(**dict(TINY_EARLY, resolution=64), stem_stride=2)
    model = RFNet(config).eval()
    first = model.scene[0][0]
    assert first.stride == (2, 2) and model.scene[1][0].stride == (2, 2)
    gen = torch.rand(1, 3, 64, 64, requires_grad=True)
    x = {"product": torch.rand(1, 3, 64, 64), "placed": torch.rand(1, 4, 64, 64),
         "height_cm": torch.tensor([10.0])}  # fmt: skip
    model.available_log_prob(generated=gen, **x).sum().backward()
    assert (gen.grad.abs().sum(1)[0] > 0).float().mean() > 0.99  # every pixel reaches it
    grid = model.scene[0](torch.rand(1, model.scene_channels + 2, 64, 64))
    assert tuple(grid.shape[-2:]) == (32, 32)
    model.save_pretrained(tmp_path / "m")
    assert RFNet.from_pretrained(tmp_path / "m").config.stem_stride == 2
    assert RFNetConfig.aligned().stem_stride == 1  # the shipped preset is unchanged


def test_inputs_are_checked_and_the_reward_reaches_the_pixels():
    model = RFNet(RFNetConfig(**TINY_EARLY)).eval()
    gen = torch.rand(2, 3, 32, 32, requires_grad=True)
    x = {"product": torch.rand(2, 3, 32, 32), "placed": torch.rand(2, 4, 32, 32),
         "height_cm": torch.tensor([10.0, 80.0])}  # fmt: skip
    model.available_log_prob(generated=gen, **x).sum().backward()
    assert gen.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs 'placed'"):
        model(generated=gen, product=x["product"], height_cm=x["height_cm"])
    with pytest.raises(ValueError, match="needs 'height_cm'"):
        model(generated=gen, product=x["product"], placed=x["placed"])
    with pytest.raises(ValueError, match=r"placed: expected a float tensor \[B, 4"):
        model(generated=gen, product=x["product"], placed=x["product"], height_cm=x["height_cm"])
    # The height is read: the same pixels at another height give other logits.
    other = dict(x, height_cm=torch.tensor([200.0, 1.0]))
    assert not torch.allclose(model(generated=gen, **x), model(generated=gen, **other))


def test_placed_on_white_is_the_placement_on_white_with_its_mask(world):
    table = pq.read_table(world / "w" / "manifest.parquet")
    photo = load_product_photo(world / "w" / table["product_path"][0].as_py())
    fill = float(table["fill"][0].as_py())
    layer, _ = place_product(photo, 32, fill)
    out = placed_on_white(photo, 32, fill)
    assert out.shape == (32, 32, 4) and out.dtype == np.uint8
    assert np.array_equal(out[..., 3], layer[..., 3])
    assert (out[..., :3][layer[..., 3] == 0] == 255).all()  # white outside the product
    opaque = layer[..., 3] == 255
    assert np.array_equal(out[..., :3][opaque], layer[..., :3][opaque])


def _squares(n: int, seed: int):
    """A task only alignment solves: a square of random colour lies on the placement mask
    (label 0) or elsewhere (label 1); its position is uniform in both classes."""
    g = torch.Generator().manual_seed(seed)
    gen, placed = torch.rand(n, 3, 32, 32, generator=g) * 0.2, torch.ones(n, 4, 32, 32)
    placed[:, 3] = 0
    labels = torch.randint(0, 2, (n,), generator=g)
    for i in range(n):
        y, x = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
        placed[i, :, y : y + 8, x : x + 8] = 0.5
        placed[i, 3, y : y + 8, x : x + 8] = 1
        if labels[i]:  # elsewhere: another corner, at least 8 px away
            y, x = (y + 16) % 24, (x + 16) % 24
        gen[i, :, y : y + 8, x : x + 8] = torch.rand(3, 1, 1, generator=g)
    return gen, placed, labels


def _fit(modalities, steps: int = 150):
    torch.manual_seed(0)
    config = RFNetConfig(fusion="early", modalities=modalities, width=8, resolution=32,
                         classes=("Available", "Space Mismatch"))  # fmt: skip
    model = RFNet(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen, placed, labels = _squares(512, seed=1)
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % 512
        loss = F.cross_entropy(model(generated=gen[idx], placed=placed[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gen, placed, labels = _squares(256, seed=2)
    with torch.no_grad():
        pred = model.eval()(generated=gen, placed=placed).argmax(1)
    return float((pred == labels).float().mean())


def test_early_fusion_compares_the_image_with_the_placement():
    with_placement = _fit(("generated", "placed"))
    without = _fit(("generated",))
    assert with_placement >= 0.9, with_placement
    assert without <= 0.7, without  # the image alone carries no signal here


def test_data_in_memory_and_on_disk_and_training(world, tmp_path):
    samples = split_by_product(load_adworld_manifest(world / "w" / "manifest.parquet"))
    config = RFNetConfig(**TINY_EARLY)
    data = prepare_inspection_data(samples, config, progress=False)
    assert data.placed.shape == (40, 4, 32, 32) and data.placed.dtype == torch.uint8
    assert data.depth is None and data.caption_tokens is None  # not read: not prepared
    heights = samples["product_height_cm"].to_numpy()
    assert np.allclose(data.height_cm.numpy(), heights)
    store = prepare_inspection_store(samples, config, tmp_path / "store", progress=False)
    rows = torch.tensor([0, 5, 39])
    a, b = data.batch(rows, config.modalities), store.batch(rows, config.modalities)
    for key in ("product", "generated", "placed", "height_cm"):
        assert torch.equal(a[key], b[key]), key
    train = RFNetTrainConfig(epochs=2, batch_size=8, lr=2e-3, schedule="onecycle", flip=True,
                             label_smoothing=0.05, degrade=0.0, degraded_copy=False)  # fmt: skip
    result = train_rfnet(store, tmp_path / "run", config, train, progress=False)
    assert result.steps == 2 * (len(store.rows("train")) // 8)
    model = RFNet.from_pretrained(tmp_path / "run" / "model")
    probs = predict_rfnet(model, data)
    assert probs.shape == (40, 6) and torch.allclose(probs.sum(1), torch.ones(40))
    # A row without a height: one line naming it.
    broken = samples.set_column(
        samples.column_names.index("product_height_cm"),
        "product_height_cm",
        pa.array([None] + heights[1:].tolist(), pa.float64()),
    ).set_column(samples.column_names.index("caption"), "caption", pa.array([""] * 40))
    with pytest.raises(ValueError, match="row 0: no product height"):
        prepare_inspection_data(broken, config, progress=False)
    with pytest.raises(ValueError, match="schedule: one of"):
        RFNetTrainConfig(lr=1e-3, batch_size=8, epochs=1, schedule="linear")


def test_cli_ablation_inspect_eval_and_judges(world, tmp_path, capsys):
    from rewardkit.generation.product import prepare_product
    from rewardkit.generation.recurrent import InspectorJudge, ProductJob
    from rewardkit.training.rfft.objectives import RFNetObjective

    model_yaml = tmp_path / "early.yaml"
    model_yaml.write_text(yaml.safe_dump(TINY_EARLY))
    manifest = world / "w" / "manifest.parquet"
    run = tmp_path / "runs"
    argv = ["train", "rfnet", "--manifest", str(manifest), "--out", str(run), "--ablation",
            "--model-config", str(model_yaml), "--max-steps", "2", "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["runs"]) == set(EARLY_VARIANTS)
    assert RFNet.from_pretrained(run / "no-placed" / "model").config.modalities == (
        "product", "generated", "height",
    )  # fmt: skip
    out = tmp_path / "eval.json"
    argv = ["eval", "rfnet", "--manifest", str(manifest), "--runs", str(run), "--out", str(out),
            "--allow-overlap"]  # fmt: skip
    assert main(argv) == 0
    assert "Modality ablation" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(EARLY_VARIANTS) and results["full"]["clean"]["n"] == 40
    # inspect: a row without any height is skipped with the reason, the rest inspected.
    model = run / "full" / "model"
    table = pq.read_table(manifest)
    i_h, i_c = table.column_names.index("product_height_cm"), table.column_names.index("caption")
    heights = table["product_height_cm"].to_pylist()
    captions = table["caption"].to_pylist()
    broken = world / "w" / "no_height.parquet"
    pq.write_table(
        table.set_column(i_h, "product_height_cm", pa.array([None] + heights[1:], pa.float64()))
        .set_column(i_c, "caption", pa.array(["a mug"] + captions[1:])), broken,
    )  # fmt: skip
    verdicts = tmp_path / "verdicts.parquet"
    argv = ["inspect", "--model", str(model), "--input", str(broken), "--out", str(verdicts),
            "--workers", "0"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inspected"] == 39 and summary["skipped"] == 1
    assert (
        "no product height"
        in json.loads((tmp_path / "verdicts.skipped.json").read_text())[0]["reason"]
    )
    # inspect's probabilities are the model's on the prepared data.
    inspector = Inspector.from_pretrained(model)
    assert inspector.uses_placement
    samples = load_adworld_manifest(manifest)
    data = prepare_inspection_data(samples, inspector.rfnet.config, progress=False)
    want = predict_rfnet(inspector.rfnet, data)[1:].numpy()
    got = pq.read_table(verdicts)["p_available"].to_numpy()
    assert np.allclose(got, want[:, 0], atol=1e-5)
    # Recurrent Generation's judge and the RFFT objective build the same placed input.
    rows = [r for r in samples.slice(0, 2).to_pylist()]
    jobs = []
    for r in rows:
        photo = load_product_photo(r["product_path"])
        jobs.append(ProductJob(
            product_id=str(len(jobs)), photo=photo, prepared=prepare_product(photo, 32, r["fill"]),
            prompt="", caption=r["caption"], height_cm=r["product_height_cm"], fill=r["fill"],
        ))  # fmt: skip
    images = data.generated[:2].float() / 255
    _, scores = InspectorJudge(inspector)(
        images, ["", ""], photos=[j.photo for j in jobs], captions=[j.caption for j in jobs],
        heights=[j.height_cm for j in jobs], fills=[j.fill for j in jobs],
    )  # fmt: skip
    assert np.allclose(scores.numpy(), predict_rfnet(inspector.rfnet, data)[:2, 0].numpy(),
                       atol=1e-5)  # fmt: skip
    objective = RFNetObjective(inspector)
    pixels = images.clone().requires_grad_(True)
    loss, reward = objective(pixels, jobs)
    loss.sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert np.allclose(reward.detach().numpy(), scores.numpy(), atol=1e-5)


def test_inspect_folder_input_takes_height_and_fill(world, tmp_path):
    from rewardkit.commands.inspect import read_inspection_input

    folder = world / "w" / "images"
    product = next((world / "w" / "products").iterdir())
    rows = read_inspection_input(folder, product, "a mug, 12 cm")
    assert set(rows["height_cm"].to_pylist()) == {12.0} and set(rows["fill"].to_pylist()) == {None}
    rows = read_inspection_input(folder, product, "a mug", height_cm=30.0, fill=0.5)
    assert set(rows["height_cm"].to_pylist()) == {30.0} and set(rows["fill"].to_pylist()) == {0.5}
    with pytest.raises(ValueError, match=r"--fill: must be in \[0.05, 1\]"):
        read_inspection_input(folder, product, "a mug", fill=2.0)


def test_class_weight_power_is_checked():
    assert RFNetTrainConfig(lr=1e-3, batch_size=8, epochs=1, class_weight_power=0.5)
    with pytest.raises(ValueError, match="class_weight_power: must be >= 0"):
        RFNetTrainConfig(lr=1e-3, batch_size=8, epochs=1, class_weight_power=-1.0)
