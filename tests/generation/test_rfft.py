"""RFFT: the loss, its regularisers, LoRA, the recipe (save, base pointer, resume), the CLI."""

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rewardkit.generation.pipeline import (
    AdGenerator,
    SamplerConfig,
    ddim_step,
    denoise,
    guided_eps,
    predict,
    prepare_batch,
)
from rewardkit.generation.product import prepare_product
from rewardkit.generation.recurrent import ProductJob
from rewardkit.training.rfft import (
    FinetuneConfig,
    RFFTTrainee,
    finetune_generator,
    parse_reward,
    rfft_loss,
)

from .conftest import product_photo

SAMPLER = SamplerConfig(steps=4, guidance_scale=2.0)


class Brightness:
    """A toy differentiable reward: mean brightness of the image (higher is better)."""

    name = "toy"
    metric = "brightness"

    def __call__(self, images, jobs):
        score = images.mean(dim=(1, 2, 3))
        return -score, score


def _jobs(size, n=4):
    photos = [product_photo(s) for s in range(3)]
    return [
        ProductJob(f"p{i}", photos[i % 3], prepare_product(photos[i % 3], size),
                   "a mug on a wooden table", "mug, 10 cm", 10.0, 0.4)
        for i in range(n)
    ]  # fmt: skip


def _fresh(tiny_generator):
    g = tiny_generator
    return AdGenerator(
        copy.deepcopy(g.unet), copy.deepcopy(g.controlnet), g.vae, g.text_encoder,
        g.tokenizer, g.scheduler,
    )  # fmt: skip


def _batch(gen, jobs, seeds=(1, 2)):
    return prepare_batch(
        gen, [j.prepared for j in jobs[: len(seeds)]], [j.prompt for j in jobs[: len(seeds)]],
        list(seeds),
    )  # fmt: skip


def test_stop_before_returns_the_input_of_that_step(tiny_generator):
    gen = tiny_generator
    jobs = _jobs(gen.resolution)
    batch = _batch(gen, jobs)
    with torch.no_grad():
        x_k = denoise(gen, batch, SAMPLER, stop_before=2).latents
        t = gen.timesteps(SAMPLER.steps)[2]
        a_t = gen.alphas_cumprod()[t]
        eps = guided_eps(gen, x_k, t, a_t, batch, SAMPLER)
        x0 = ddim_step(x_k, eps, a_t, a_t)[1]
        ref = denoise(gen, batch, SAMPLER, stop_at=2).x0_hat
    assert torch.allclose(x0, ref, atol=1e-5)
    with pytest.raises(ValueError, match="stop_before"):
        denoise(gen, batch, SAMPLER, stop_before=4)


@pytest.mark.parametrize("regularizer", ["cc", "kl"])
def test_regularisers_vanish_at_the_reference_and_grow_after_a_step(tiny_generator, regularizer):
    gen = _fresh(tiny_generator)
    trainee = RFFTTrainee(gen, "controlnet")
    jobs = _jobs(gen.resolution)
    batch = _batch(gen, jobs)
    loss, logs = rfft_loss(gen, trainee, batch, jobs[:2], Brightness(), SAMPLER, 3,
                           regularizer, 1.0)  # fmt: skip
    assert logs["regularizer"] == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    grads = [p.grad for p in gen.controlnet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the reward reaches the ControlNet
    assert all(p.grad is None for p in gen.unet.parameters())  # frozen
    with torch.no_grad():
        for p in gen.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, logs = rfft_loss(gen, trainee, batch, jobs[:2], Brightness(), SAMPLER, 3, regularizer, 1.0)
    assert logs["regularizer"] > 0


def test_kl_beta_adds_the_kl_term_beside_cc(tiny_generator):
    """--kl-beta: F = F_AC + beta L_CC + kl_beta L_KL, each term as the single regularisers
    compute it; refused beside any regulariser but cc."""
    gen = _fresh(tiny_generator)
    trainee = RFFTTrainee(gen, "controlnet")
    jobs = _jobs(gen.resolution)
    batch = _batch(gen, jobs)
    with torch.no_grad():
        for p in gen.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = (gen, trainee, batch, jobs[:2], Brightness(), SAMPLER, 3)
    cc, cc_logs = rfft_loss(*args, "cc", 2.0)
    kl, kl_logs = rfft_loss(*args, "kl", 1.0)
    both, logs = rfft_loss(*args, "cc", 2.0, kl_beta=3.0)
    assert kl_logs["regularizer"] > 0 and logs["regularizer_kl"] == pytest.approx(
        kl_logs["regularizer"]
    )
    assert float(both) == pytest.approx(float(cc) + 3.0 * kl_logs["regularizer"], rel=1e-5)
    assert "regularizer_kl" not in cc_logs
    with pytest.raises(ValueError, match="kl_beta"):
        rfft_loss(*args, "kl", 1.0, kl_beta=3.0)
    with pytest.raises(ValueError, match="kl_beta"):
        FinetuneConfig(regularizer="none", kl_beta=1.0)
    assert FinetuneConfig(regularizer="cc", kl_beta=1.0).kl_beta == 1.0


def test_cc_is_blind_to_a_shift_shared_by_both_predictions(tiny_generator):
    """L_CC compares guidance directions only: shifting eps(x, z, c) and eps(x, c) alike
    (what a changed ControlNet residual does to both) costs nothing under CC but does under
    KL. Checked on the formula with a ControlNet whose output is scaled for both halves."""
    gen = _fresh(tiny_generator)
    trainee = RFFTTrainee(gen, "controlnet")
    jobs = _jobs(gen.resolution)
    batch = _batch(gen, jobs)
    t = gen.timesteps(SAMPLER.steps)[3]
    x = batch.noise
    a = gen.alphas_cumprod()[t]
    with torch.no_grad():
        text = torch.cat([batch.uncond, batch.text])
        out = predict(gen, torch.cat([x, x]), t, batch, text)
        eps_u, eps_c = gen.to_eps_x0(out, torch.cat([x, x]), a)[0].chunk(2)
    shift = torch.randn_like(eps_u)
    d_cc = ((eps_c + shift) - (eps_u + shift)) - (eps_c - eps_u)
    assert d_cc.abs().max() < 1e-5
    w = SAMPLER.guidance_scale
    d_kl = (eps_u + shift + w * (eps_c - eps_u)) - (eps_u + w * (eps_c - eps_u))
    assert d_kl.abs().mean() > 0.1
    assert trainee.kind == "controlnet"


def test_lora_trains_adapters_only_and_merges_exactly(tiny_generator):
    gen = _fresh(tiny_generator)
    trainee = RFFTTrainee(gen, "lora", lora_rank=4)
    trainable = [n for n, p in trainee.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapters away from their (identity) start
        for n, p in trainee.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    jobs = _jobs(gen.resolution)
    batch = _batch(gen, jobs)
    t = gen.timesteps(4)[1]
    with torch.no_grad():
        adapted = predict(gen, batch.noise, t, batch, batch.text)
        with trainee.as_reference(gen):
            reference = predict(gen, batch.noise, t, batch, batch.text)
        merged = trainee.merged_components()
        fused = predict(gen, batch.noise, t, batch, batch.text,
                        unet=merged["unet"], controlnet=merged["controlnet"])  # fmt: skip
    assert not torch.allclose(adapted, reference, atol=1e-4)
    assert torch.allclose(adapted, fused, atol=1e-4)
    assert not any("lora" in k for k in merged["unet"].state_dict())


def test_trainable_all_tunes_unet_and_controlnet_against_frozen_copies(tmp_path, tiny_generator):
    gen = _fresh(tiny_generator)
    trainee = RFFTTrainee(gen, "all")
    names = {n.split(".")[0] for n, p in trainee.named_parameters() if p.requires_grad}
    assert names == {"unet", "controlnet"}
    assert all(p.requires_grad for p in gen.unet.parameters())
    assert not any(p.requires_grad for p in gen.vae.parameters())
    jobs = _jobs(gen.resolution)
    batch = _batch(gen, jobs)
    t = gen.timesteps(4)[1]
    with torch.no_grad():
        before = predict(gen, batch.noise, t, batch, batch.text)
        for p in gen.unet.parameters():  # a step away from the start
            p.add_(0.01 * torch.randn_like(p))
        moved = predict(gen, batch.noise, t, batch, batch.text)
        with trainee.as_reference(gen) as (unet_r, cn_r):
            reference = predict(gen, batch.noise, t, batch, batch.text, unet=unet_r,
                                controlnet=cn_r)  # fmt: skip
    assert torch.allclose(reference, before, atol=1e-5)
    assert not torch.allclose(moved, before, atol=1e-4)
    # The saved run holds both components; loading it gives the fine-tuned UNet.
    base = tmp_path / "base"
    tiny_generator.save_pretrained(base)
    cfg = FinetuneConfig(
        lr=5e-3, batch_size=2, max_steps=2, regularizer="cc", beta=0.1, sample_steps=4,
        grad_window=2, probe_every=0, probe_size=2, trainable="all",
    )  # fmt: skip
    jobs = _jobs(tiny_generator.resolution, n=6)
    out = tmp_path / "run"
    finetune_generator(base, jobs[:4], jobs[4:], Brightness(), cfg, out, SAMPLER, False)
    assert (out / "model" / "unet").is_dir() and (out / "model" / "controlnet").is_dir()
    tuned, ref = AdGenerator.from_pretrained(out / "model"), AdGenerator.from_pretrained(base)
    sd_t, sd_r = tuned.unet.state_dict(), ref.unet.state_dict()
    assert any(not torch.equal(sd_t[k], sd_r[k]) for k in sd_r)


def test_finetune_saves_a_delta_folder_resumes_and_moves_the_reward(tmp_path, tiny_generator):
    base = tmp_path / "base"
    tiny_generator.save_pretrained(base)
    jobs = _jobs(tiny_generator.resolution, n=8)
    cfg = FinetuneConfig(
        lr=5e-3, batch_size=2, max_steps=3, regularizer="cc", beta=0.1, sample_steps=4,
        grad_window=2, probe_every=2, probe_size=2, checkpoint_every=1,
    )  # fmt: skip
    sampler = SamplerConfig(steps=4, guidance_scale=2.0)
    out = tmp_path / "run"
    s1 = finetune_generator(base, jobs[:6], jobs[6:], Brightness(), cfg, out, sampler, False)
    assert s1["steps"] == 3 and s1["resumed_from"] == 0
    model = out / "model"
    assert (model / "controlnet").is_dir() and not (model / "unet").is_dir()
    card = json.loads((model / "rewardkit_generator.json").read_text())
    assert card["finetune"]["regularizer"] == "cc" and card["sampler"]["steps"] == 4
    tuned = AdGenerator.from_pretrained(model)
    ref = AdGenerator.from_pretrained(base)
    sd_t, sd_r = tuned.controlnet.state_dict(), ref.controlnet.state_dict()
    assert any(not torch.equal(sd_t[k], sd_r[k]) for k in sd_r)
    unets = zip(tuned.unet.state_dict().values(), ref.unet.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in unets)
    assert (out / "curves.csv").is_file() and (out / "curves.png").is_file()
    header = (out / "curves.csv").read_text().splitlines()[0]
    assert "reward_loss" in header and "probe_oracle_available" in header
    # Resume: the same run with a larger budget continues from the checkpoint.
    cfg2 = FinetuneConfig(**{**cfg.__dict__, "max_steps": 5})
    s2 = finetune_generator(base, jobs[:6], jobs[6:], Brightness(), cfg2, out, sampler, False)
    assert s2["resumed_from"] == 3 and s2["steps"] == 5
    # The toy reward (brightness) went up on the probe set.
    assert s2["probe_after"]["probe_brightness"] > s2["probe_before"]["probe_brightness"]


def test_parse_reward_and_config_errors():
    assert parse_reward("rfnet") == ("rfnet", None)
    assert parse_reward("social:/m") == ("social", "/m")
    with pytest.raises(ValueError, match="--reward"):
        parse_reward("clip:/m")
    with pytest.raises(ValueError, match="regularizer"):
        FinetuneConfig(regularizer="l2")
    with pytest.raises(ValueError, match="beta"):
        FinetuneConfig(beta=-1)


def test_rfnet_objective_gradient_reaches_the_latents(tiny_generator):
    """F_AC through the shipped inspector (depth, saliency, caption) back to x0_hat."""
    from rewardkit.training.rfft import load_objective

    objective = load_objective("rfnet", None)
    gen = tiny_generator
    jobs = _jobs(gen.resolution, n=2)
    batch = _batch(gen, jobs)
    lat = batch.noise.clone().requires_grad_(True)
    images = gen.decode_latents(lat)
    loss, p = objective(images, jobs)
    assert loss.shape == (2,) and torch.all((p > 0) & (p < 1))
    loss.sum().backward()
    assert lat.grad is not None and lat.grad.abs().sum() > 0
    np.testing.assert_allclose(p.detach().numpy(), np.exp(-loss.detach().numpy()), rtol=1e-5)


def test_rfnet_ensemble_and_jittered_views_average_the_loss(tiny_generator):
    """Two copies of one inspector give that inspector's loss; jittered views are different
    inputs (so a different loss), reproducible from the generator's seed, and still carry a
    gradient to the latents."""
    from rewardkit.models.defaults import default_model_path
    from rewardkit.training.rfft import RFNetObjective, load_objective

    folder = str(default_model_path("rfnet"))
    single = load_objective("rfnet", folder)
    pair = load_objective("rfnet", f"{folder},{folder}")
    assert len(pair.inspectors) == 2
    gen = tiny_generator
    jobs = _jobs(gen.resolution, n=2)
    images = gen.decode_latents(_batch(gen, jobs).noise)
    with torch.no_grad():
        l1, _ = single(images, jobs)
        l2, _ = pair(images, jobs)
    torch.testing.assert_close(l1, l2)
    assert pair.classify(images, jobs)[0] == single.classify(images, jobs)[0]
    viewed = RFNetObjective(single.inspectors, views=3)
    lat = _batch(gen, jobs).noise.clone().requires_grad_(True)
    la, _ = viewed(gen.decode_latents(lat), jobs, torch.Generator().manual_seed(5))
    with torch.no_grad():
        lb, _ = viewed(images, jobs, torch.Generator().manual_seed(5))
    torch.testing.assert_close(la.detach(), lb)
    assert not torch.allclose(lb, l1)
    la.sum().backward()
    assert lat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="views"):
        RFNetObjective(single.inspectors, views=0)
    with pytest.raises(ValueError, match="reward_views"):
        FinetuneConfig(reward_views=0)


def test_eval_generator_cli_table_grids_and_recurrent_row(tmp_path, tiny_generator, monkeypatch):
    from rewardkit.cli import main
    from rewardkit.generation import evaluate
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.rfnet import RFNetConfig
    from rewardkit.world.export import render_world

    thresholds = []  # the RFNet column's judge: inspect's operating point, not the loop's test
    judge_images = evaluate.judge_images

    def recording(judge, *a):
        thresholds.append(judge.threshold)
        return judge_images(judge, *a)

    monkeypatch.setattr(evaluate, "judge_images", recording)

    base = tmp_path / "base"
    tiny_generator.save_pretrained(base)
    (base / "rewardkit_generator.json").write_text(
        json.dumps({"sampler": {"steps": 2, "guidance_scale": 1.0}})
    )
    render_world(tmp_path / "world", n=4, seed=1, size=64, balance="Available=1", progress=False)
    rc = main([
        "eval", "generator", "--products", str(tmp_path / "world"), "--model", f"A={base}",
        "--model", f"B={base}", "--out", str(tmp_path / "ev"), "--limit", "4", "--seeds", "2",
        "--diversity-products", "3", "--recurrent-attempts", "2", "--batch-size", "4",
    ])  # fmt: skip
    assert rc == 0
    res = json.loads((tmp_path / "ev" / "generator_eval.json").read_text())
    names = [r["model"] for r in res["rows"]]
    assert names[0] == "A" and names[1].startswith("Recurrent Generation") and names[2] == "B"
    a, b = res["rows"][0], res["rows"][2]
    assert a["oracle_available"] == b["oracle_available"]  # same weights, same seeds
    assert a["diversity"] == pytest.approx(b["diversity"]) and a["diversity_vs_base"] == 1.0
    assert 0 <= a["rfnet_available"] <= 1 and a["images"] == 4
    assert a["palette"] == pytest.approx(b["palette"]) and a["palette_vs_base"] == 1.0
    from rewardkit.world.scene import prompt_props

    prompts = pq.read_table(tmp_path / "world" / "manifest.parquet").column("prompt").to_pylist()
    assert a["props_named"] == b["props_named"] == sum(bool(prompt_props(p)) for p in prompts[:4])
    assert a["prop_painted"] == b["prop_painted"] or a["props_named"] == 0
    config = RFNetConfig.from_folder(default_model_path("rfnet"))
    assert config.loop_threshold is not None and config.loop_threshold != config.accept_threshold
    assert thresholds == [config.accept_threshold] * 3  # A, the Recurrent row, B
    assert (tmp_path / "ev" / "compare.png").is_file()
    assert (tmp_path / "ev" / "grids" / "A.png").is_file()
    assert "| A |" in (tmp_path / "ev" / "generator_eval.md").read_text()
    assert main(["eval", "generator", "--products", str(tmp_path / "world"),
                 "--model", "bad", "--out", str(tmp_path / "x")]) == 2  # fmt: skip


def test_replay_scores_generated_images_keeps_the_best_and_counts_unreadable(tmp_path):
    """score_generated + select_replay: the reward ranks the images, the best share is kept
    (best first), a row whose image is missing is skipped and counted."""
    import pyarrow as pa
    from PIL import Image

    from rewardkit.io import write_parquet_atomic
    from rewardkit.training.rfft import score_generated, select_replay

    (tmp_path / "images").mkdir()
    (tmp_path / "products").mkdir()
    Image.fromarray(product_photo(0)).save(tmp_path / "products" / "p.png")
    levels = [40, 200, 120, 250, 10]
    rows = []
    for i, v in enumerate(levels):
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        rows.append({"path": f"images/{i}.png", "product_path": "products/p.png",
                     "prompt": "a mug on a table", "fill": 0.4})  # fmt: skip
    rows.append({**rows[0], "path": "images/missing.png"})
    write_parquet_atomic(tmp_path / "manifest.parquet", pa.Table.from_pylist(rows))
    scored = score_generated(tmp_path, Brightness(), 32)
    assert scored.num_rows == 5 and scored.schema.metadata[b"skipped"] == b"1"
    chosen = select_replay(scored, 0.4)
    assert [p.split("/")[-1] for p in chosen.column("path").to_pylist()] == ["3.png", "1.png"]
    assert all(p.startswith("/") for p in chosen.column("product_path").to_pylist())
    assert select_replay(scored, 0.01).num_rows == 1
    with pytest.raises(ValueError, match="replay_top"):
        FinetuneConfig(replay_top=0)
    write_parquet_atomic(tmp_path / "bad.parquet", pa.table({"path": ["images/0.png"]}))
    with pytest.raises(ValueError, match="needs columns"):
        score_generated(tmp_path / "bad.parquet", Brightness(), 32)


def test_finetune_replay_only_lowers_the_denoising_loss_on_the_replay_set(tmp_path, tiny_generator):
    """reward_weight 0, no regulariser: the ControlNet learns the replay images alone; the
    denoising loss on them (fixed rows and noise) falls. Without a replay set that is an error."""
    from rewardkit.training.generator import (
        DenoisingSet,
        GeneratorData,
        denoising_loss,
    )

    base = tmp_path / "base"
    tiny_generator.save_pretrained(base)
    jobs = _jobs(tiny_generator.resolution, n=6)
    n = 4
    pp = [j.prepared for j in jobs[:n]]

    def t(arrs):
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()

    rng = np.random.default_rng(0)
    data = GeneratorData(
        images=t([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]),
        control=t([p.control[..., :1] for p in pp]),
        inpaint=t([p.inpaint[..., None] > 0.5 for p in pp]),
        product=t([p.product for p in pp]),
        prompts=[j.prompt for j in jobs[:n]],
        fingerprint={"test": 1},
    )
    cfg = FinetuneConfig(
        lr=5e-3, batch_size=2, max_steps=8, regularizer="none", reward_weight=0.0,
        sample_steps=4, grad_window=2, probe_every=0, probe_size=2, replay_batch=4,
    )  # fmt: skip

    def replay_loss(gen):
        ds = DenoisingSet.build(gen, data)
        with torch.no_grad():
            return float(denoising_loss(gen, ds, torch.arange(n), torch.Generator().manual_seed(3)))

    with pytest.raises(ValueError, match="replay"):
        finetune_generator(base, jobs[:4], jobs[4:], Brightness(), cfg, tmp_path / "r0", SAMPLER,
                           False)  # fmt: skip
    out = tmp_path / "run"
    finetune_generator(base, jobs[:4], jobs[4:], Brightness(), cfg, out, SAMPLER, False, data)
    before = replay_loss(AdGenerator.from_pretrained(base))
    after = replay_loss(AdGenerator.from_pretrained(out / "model"))
    assert after < before
    header = (out / "curves.csv").read_text().splitlines()[0]
    assert "replay_loss" in header and "reward_loss" not in header


def test_finetune_cli_replay_keeps_the_rewards_best_share(tmp_path, tiny_generator, monkeypatch):
    """`rewardkit finetune --replay`: the reward (embedded RFNet) scores the manifest's images
    (here renders, as for reward-ranked training data), the best --replay-top are written to
    replay.parquet and trained on; a resumed run reuses that selection."""
    import pyarrow.parquet as pq

    from rewardkit.cli import main
    from rewardkit.world.export import render_world

    base = tmp_path / "base"
    tiny_generator.save_pretrained(base)
    (base / "rewardkit_generator.json").write_text(
        json.dumps({"sampler": {"steps": 2, "guidance_scale": 1.0}})
    )
    world = tmp_path / "world"
    render_world(world, n=6, seed=1, size=32, balance="Available=0.5,Space Mismatch=0.5",
                 progress=False)  # fmt: skip
    run = tmp_path / "run"
    args = [
        "finetune", "--generator", str(base), "--products", str(world), "--out", str(run),
        "--max-steps", "2", "--batch-size", "2", "--probe-size", "2", "--probe-every", "0",
        "--grad-window", "1",
        "--replay", str(world), "--replay-top", "0.5", "--replay-batch", "2",
        "--reward-weight", "0", "--regularizer", "none", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((run / "finetune_summary.json").read_text())
    assert summary["replay"]["scored"] == 6 and summary["replay"]["kept"] == 3
    kept = pq.read_table(run / "replay.parquet").column("reward").to_pylist()
    assert kept == sorted(kept, reverse=True)
    assert summary["replay"]["reward_threshold"] == min(kept)
    assert summary["replay"]["reward_mean_kept"] >= summary["replay"]["reward_mean_all"]
    assert (run / "model" / "controlnet").is_dir()

    # Resuming the run reuses the selection instead of scoring the manifest again.
    def no_scoring(*a, **k):
        raise AssertionError("replay scored again on resume")

    monkeypatch.setattr("rewardkit.commands.finetune.score_generated", no_scoring)
    args[args.index("--max-steps") + 1] = "3"
    assert main(args) == 0
    again = json.loads((run / "finetune_summary.json").read_text())
    assert again["steps"] == 3 and again["resumed_from"] == 2
    assert again["replay"]["kept"] == 3
    assert pq.read_table(run / "replay.parquet").column("reward").to_pylist() == kept
