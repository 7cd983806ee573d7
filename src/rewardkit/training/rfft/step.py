"""One RFFT step: the trainable part of the generator and the loss at a random late step.

Steps 1-4 of the package docstring: a DDIM run without gradients up to ``t``, the
fine-tuned model's guided prediction at ``t`` with gradients, the one-step ``x0_hat``
decoded and judged by the objective, plus ``beta`` times the regulariser
(``regularizers.py``) against the frozen reference.

Devices: the training loop places the trainee (the trained modules) on its device; each step
moves what else it touches beside it (the rest of the generator: UNet or ControlNet, VAE,
text encoder; the frozen reference copies; the objective's models and cached products; the
batch), so a CUDA run never mixes devices. Schedule arithmetic is fp32 (the one-step x0_hat,
alpha-bar, the regularisers), whatever the precision the networks run in.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

from rewardkit.generation.pipeline import (
    AdGenerator,
    GenerationBatch,
    SamplerConfig,
    denoise,
    paste_back_tensor,
    predict,
)
from rewardkit.generation.recurrent import ProductJob
from rewardkit.training.rfft.regularizers import regularizer_loss

TRAINABLE = ("controlnet", "lora", "all")


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class RFFTTrainee(nn.Module):
    """The modules whose weights RFFT changes, and how to get the frozen reference."""

    def __init__(self, gen: AdGenerator, trainable: str, lora_rank: int = 8) -> None:
        super().__init__()
        self.kind = trainable
        for m in gen.modules():
            m.requires_grad_(False)
        if trainable in ("controlnet", "all"):
            # Frozen copies, kept in lists so that they are not submodules (not optimised,
            # not checkpointed).
            self.reference_controlnet = [copy.deepcopy(gen.controlnet).eval()]
            self.controlnet = gen.controlnet
            self.controlnet.requires_grad_(True)
            self.unet = None
            self.reference_unet = [None]
            if trainable == "all":
                self.reference_unet = [copy.deepcopy(gen.unet).eval()]
                self.unet = gen.unet
                self.unet.requires_grad_(True)
        else:
            from peft import LoraConfig

            cfg = LoraConfig(
                r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )  # fmt: skip
            gen.unet.add_adapter(cfg)
            gen.controlnet.add_adapter(cfg)
            self.unet, self.controlnet = gen.unet, gen.controlnet
            for name, p in [*gen.unet.named_parameters(), *gen.controlnet.named_parameters()]:
                p.requires_grad_("lora_" in name)

    @property
    def device(self) -> torch.device:
        """Where the trained modules are (the training loop put them there)."""
        return next(self.parameters()).device

    def place(self, gen: AdGenerator, device: torch.device) -> None:
        """Move the generator's other modules and the frozen reference copies to ``device``
        (a no-op when they are there)."""
        references = [
            *getattr(self, "reference_unet", []),
            *getattr(self, "reference_controlnet", []),
        ]
        for m in [*gen.modules(), *references]:
            if m is not None and next(m.parameters()).device != device:
                m.to(device)

    @contextmanager
    def as_reference(self, gen: AdGenerator):
        """Within: the generator computes the frozen reference model."""
        if self.kind == "lora":
            gen.unet.disable_adapters()
            gen.controlnet.disable_adapters()
            try:
                yield None, None
            finally:
                gen.unet.enable_adapters()
                gen.controlnet.enable_adapters()
        else:
            yield self.reference_unet[0], self.reference_controlnet[0]

    def merged_components(self) -> dict[str, nn.Module]:
        """The fine-tuned components as plain diffusers models (LoRA fused and unloaded)."""
        if self.kind == "controlnet":
            return {"controlnet": self.controlnet}
        if self.kind == "all":
            return {"unet": self.unet, "controlnet": self.controlnet}
        out = {}
        for name, module in (("unet", self.unet), ("controlnet", self.controlnet)):
            m = copy.deepcopy(module)
            m.fuse_lora(lora_scale=1.0)
            m.unload_lora()
            out[name] = m
        return out


def _eps_pair(gen, x, t, a_t, batch, sampler, unet, controlnet):
    """(eps(x_t, c), eps(x_t, z, c)): unconditional and prompt-conditioned, one doubled batch."""
    x2 = torch.cat([x, x])
    text = torch.cat([batch.uncond, batch.text])
    out = predict(gen, x2, t, batch, text, sampler.controlnet_scale, unet, controlnet)
    return gen.to_eps_x0(out, x2, a_t)[0].chunk(2)


def rfft_loss(
    gen: AdGenerator,
    trainee: RFFTTrainee,
    batch: GenerationBatch,
    jobs: list[ProductJob],
    objective,
    sampler: SamplerConfig,
    step_index: int,
    regularizer: str,
    beta: float,
    grad_checkpoint_step: bool = True,
    rng: torch.Generator | None = None,
    reward_weight: float = 1.0,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The module docstring's steps 1-4 for one batch: (F_total, logged values). ``kl_beta``
    > 0 (with ``regularizer`` cc) adds ``kl_beta`` times the KL term beside it."""
    loss, terms = rfft_terms(
        gen, trainee, batch, jobs, objective, sampler, step_index, regularizer, beta,
        grad_checkpoint_step, rng, reward_weight, kl_beta,
    )  # fmt: skip
    logs = {k: v if isinstance(v, int) else float(v.detach()) for k, v in terms.items()}
    return loss, logs


def rfft_terms(
    gen: AdGenerator,
    trainee: RFFTTrainee,
    batch: GenerationBatch,
    jobs: list[ProductJob],
    objective,
    sampler: SamplerConfig,
    step_index: int,
    regularizer: str,
    beta: float,
    grad_checkpoint_step: bool = True,
    rng: torch.Generator | None = None,
    reward_weight: float = 1.0,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
    """:func:`rfft_loss` without reading values back: (F_total, logged terms as tensors on
    the trainee's device, and ``t``). Moves every frozen part the step uses, and the batch,
    to the trainee's device first."""
    device = trainee.device
    trainee.place(gen, device)
    if hasattr(objective, "to"):
        objective.to(device)
    batch = batch.to(device)
    steps = gen.timesteps(sampler.steps)
    t = steps[step_index]
    a_t = gen.alphas_cumprod()[t]  # fp32, also under bf16/fp16 networks
    with torch.no_grad():
        x_t = denoise(gen, batch, sampler, stop_before=step_index).latents
    w = sampler.guidance_scale

    def fine_tuned(x):
        eps_u, eps_c = _eps_pair(gen, x, t, a_t, batch, sampler, None, None)
        return eps_u, eps_c

    if grad_checkpoint_step:
        eps_u, eps_c = grad_checkpoint(fine_tuned, x_t, use_reentrant=False)
    else:
        eps_u, eps_c = fine_tuned(x_t)
    eps = eps_u + w * (eps_c - eps_u)  # fp32 (to_eps_x0)
    x0 = (x_t.float() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    images = paste_back_tensor(gen.decode_latents(x0), batch)
    # Objectives that draw random views take the step's generator (resume-exact).
    if getattr(objective, "takes_rng", False):
        reward_loss, reward = objective(images, jobs, rng)
    else:
        reward_loss, reward = objective(images, jobs)
    loss = reward_weight * reward_loss.float().mean()
    reg = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if regularizer != "none":
        with torch.no_grad(), trainee.as_reference(gen) as (unet_r, cn_r):
            reference = _eps_pair(gen, x_t, t, a_t, batch, sampler, unet_r, cn_r)
        reg = regularizer_loss(regularizer, reference, x_t, a_t, w, eps_u, eps_c, x0)
        loss = loss + beta * reg
    terms = {
        "reward_loss": reward_loss.detach().float().mean(),
        "regularizer": reg.detach(),
        "reward": reward.detach().float().mean(),
        "t": int(t),
    }
    if kl_beta > 0:
        if regularizer != "cc":
            raise ValueError(f"kl_beta: only beside regularizer cc; got {regularizer!r}")
        # CC keeps the prompt's guidance direction only: a shift the conditional and the
        # unconditional predictions share (a whole palette) costs it nothing; KL sees it.
        reg_kl = regularizer_loss("kl", reference, x_t, a_t, w, eps_u, eps_c, x0)
        loss = loss + kl_beta * reg_kl
        terms["regularizer_kl"] = reg_kl.detach()
    return loss, terms
