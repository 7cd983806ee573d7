"""Schedule arithmetic stays fp32 under bf16/fp16 networks: DDIM eq. 1, x0_hat, the product
blend eq. 2, the CC scaling and the RFFT step at t = 1 (alpha-bar near 1)."""

from __future__ import annotations

import copy

import pytest
import torch

import rewardkit.generation.pipeline as pipeline
from rewardkit.generation.pipeline import AdGenerator, SamplerConfig, denoise, prepare_batch
from rewardkit.generation.product import prepare_product
from rewardkit.losses import consistent_condition_loss
from rewardkit.training.rfft import RFFTTrainee, regularizer_loss, rfft_loss

from .conftest import product_photo, sd15_scheduler

DTYPES = [torch.bfloat16, torch.float16]
TOL = 1e-3


def _generator(tiny_generator, dtype: torch.dtype) -> AdGenerator:
    """The tiny networks in ``dtype`` with SD 1.5's schedule (its 40-step run ends at t = 1)."""
    from diffusers import DDIMScheduler

    g = tiny_generator
    nets = (copy.deepcopy(m) for m in (g.unet, g.controlnet, g.vae, g.text_encoder))
    scheduler = DDIMScheduler.from_config(sd15_scheduler().config)
    return AdGenerator(*nets, g.tokenizer, scheduler).to("cpu", dtype)


def _batch(gen: AdGenerator):
    products = [prepare_product(product_photo(s), gen.resolution) for s in range(2)]
    return prepare_batch(gen, products, ["a mug on a table", "a lamp"], [3, 4])


@pytest.mark.parametrize("dtype", DTYPES)
def test_last_five_ddim_steps_match_fp64_arithmetic(tiny_generator, dtype, monkeypatch):
    """One 40-step run: the network really runs (in ``dtype``) on the last five steps and a
    cheap stand-in of the same dtype before; every last step's x0_hat and x_prev (eq. 1, then
    eq. 2) equal the float64 arithmetic on the same network output within 1e-3."""
    gen = _generator(tiny_generator, dtype)
    config = SamplerConfig(steps=40, guidance_scale=2.0)
    steps = gen.timesteps(40)
    assert steps[-1] <= 1  # alpha-bar within 1e-3 of 1: 1 - a_t rounds to 0 in bf16
    late = set(steps[-5:])
    real_predict, real_ddim = pipeline.predict, pipeline.ddim_step
    seen: dict[int, dict] = {}
    order: list[int] = []

    def predict(gen_, x_t, t, *args, **kwargs):
        if t in late:
            out = real_predict(gen_, x_t, t, *args, **kwargs)
        else:  # an output of the network's dtype, without the cost of running it
            a = gen_.alphas_cumprod()[t]
            out = ((1 - a).sqrt() * x_t).to(dtype).float()
        if t in late:
            seen[t] = {"x": x_t[: x_t.shape[0] // 2].clone(), "out": out.clone()}
        order.append(t)
        return out

    def ddim_step(x_t, eps, a_t, a_prev):
        x_prev, x0 = real_ddim(x_t, eps, a_t, a_prev)
        t = order[-1]
        if t in late:
            seen[t]["x0"] = x0.clone()
        return x_prev, x0

    monkeypatch.setattr(pipeline, "predict", predict)
    monkeypatch.setattr(pipeline, "ddim_step", ddim_step)
    batch = _batch(gen)
    with torch.no_grad():
        final = denoise(gen, batch, config).latents
    assert final.dtype == torch.float32

    acp = gen.scheduler.alphas_cumprod.double()
    last = torch.tensor(float(gen.scheduler.final_alpha_cumprod), dtype=torch.float64)
    stride = gen.scheduler.config.num_train_timesteps // 40
    naive_errors = []
    for k, t in enumerate(steps[-5:]):
        x, out = seen[t]["x"].double(), seen[t]["out"].double()
        assert seen[t]["out"].dtype == torch.float32  # the network's output, cast up
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + config.guidance_scale * (eps_c - eps_u)  # epsilon prediction
        a_t = acp[t]
        a_prev = acp[t - stride] if t - stride >= 0 else last
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        noised = a_prev.sqrt() * batch.product_lat.double() + (1 - a_prev).sqrt() * batch.noise
        keep = batch.keep_lat.double()
        x_prev = (1 - keep) * x_prev + keep * noised
        nxt = seen[steps[-4 + k]]["x"] if k < 4 else final
        assert (seen[t]["x0"].double() - x0).abs().max() < TOL, t
        assert (nxt.double() - x_prev).abs().max() < TOL, t
        # The same eq. 1 in the network's dtype misses by more: the tolerance tells them apart.
        a_lo, x_lo, eps_lo = a_t.to(dtype), x.to(dtype), eps.to(dtype)
        x0_lo = (x_lo - (1 - a_lo).sqrt() * eps_lo) / a_lo.sqrt()
        naive_errors.append(float((x0_lo.double() - x0).abs().max()))
    assert max(naive_errors) > TOL, naive_errors


@pytest.mark.parametrize("dtype", DTYPES)
def test_cc_scaling_is_finite_and_fp32_at_t1(tiny_generator, dtype):
    """At t = 1 (a_t = 0.99915) a bf16 alpha-bar is 1.0 and the CC scaling divided by 0; the
    loss is now computed in fp32 from the fp32 alpha-bar, whatever the predictions' dtype."""
    gen = _generator(tiny_generator, torch.float32)
    a = gen.alphas_cumprod()[1]
    assert a.dtype == torch.float32 and float(a.to(torch.bfloat16)) == 1.0
    g = torch.Generator().manual_seed(0)
    eps_u, eps_c, ref_u, ref_c = (torch.randn(2, 4, 8, 8, generator=g).to(dtype) for _ in range(4))
    loss = consistent_condition_loss(eps_u, eps_c, ref_u, ref_c, a)
    d = (eps_c.double() - eps_u.double()) - (ref_c.double() - ref_u.double())
    expected = d.pow(2).mean() / (1 - a.double())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(float(loss) / float(expected) - 1) < TOL
    via_step = regularizer_loss("cc", (ref_u, ref_c), eps_u, a, 2.0, eps_u, eps_c, eps_u)
    assert torch.isfinite(via_step) and abs(float(via_step) / float(expected) - 1) < TOL
    with pytest.raises(ValueError, match="fp32"):
        consistent_condition_loss(eps_u, eps_c, ref_u, ref_c, a.to(torch.bfloat16))
    # KL at t = 1: the reference's x0_hat from fp32 alpha-bar, finite.
    kl = regularizer_loss("kl", (ref_u, ref_c), eps_u, a, 2.0, eps_u, eps_c, eps_u)
    assert torch.isfinite(kl) and kl.dtype == torch.float32


class _Brightness:
    name, metric = "toy", "brightness"

    def __call__(self, images, jobs):
        score = images.mean(dim=(1, 2, 3))
        return -score, score


def test_rfft_step_at_t1_in_bf16_is_finite(tiny_generator):
    """The RFFT loss at the last step of SD's schedule (t = 1) with a bf16 generator and CC:
    the regulariser vanishes at the reference (0, where bf16 alpha-bar gave 0 / 0 = NaN) and
    the reward's gradient reaches the ControlNet."""
    from rewardkit.generation.recurrent import ProductJob

    gen = _generator(tiny_generator, torch.bfloat16)
    trainee = RFFTTrainee(gen, "controlnet")
    photos = [product_photo(s) for s in range(2)]
    jobs = [
        ProductJob(f"p{i}", p, prepare_product(p, gen.resolution), "a mug", "mug, 10 cm", 10.0,
                   0.4)
        for i, p in enumerate(photos)
    ]  # fmt: skip
    batch = prepare_batch(gen, [j.prepared for j in jobs], [j.prompt for j in jobs], [1, 2])
    sampler = SamplerConfig(steps=4, guidance_scale=2.0)
    assert gen.timesteps(4)[-1] == 1
    loss, logs = rfft_loss(gen, trainee, batch, jobs, _Brightness(), sampler, 3, "cc", 1.0)
    assert logs["t"] == 1 and torch.isfinite(loss)
    assert logs["regularizer"] == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    grads = [p.grad for p in gen.controlnet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
