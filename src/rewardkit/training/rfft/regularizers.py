"""RFFT regularisers: what keeps the fine-tuned generator close to the frozen reference.

- ``cc``: Consistent Condition (``losses.consistent_condition_loss``): the prompt's guidance
  direction ``eps(x_t, z, c) - eps(x_t, c)`` kept as the reference model has it;
- ``kl``: the one-step predictions kept close (``losses.one_step_kl_loss``);
- ``none``: nothing (ReFL-like; collapses onto what the reward likes).

Both compare the two models at the same ``x_t`` and step; the reference's predictions are
computed without gradients by the caller (``step.rfft_loss``). Both are computed in fp32
whatever the networks' dtype (alpha-bar near 1 late in sampling).
"""

from __future__ import annotations

import torch

from rewardkit.losses import consistent_condition_loss, one_step_kl_loss

__all__ = ["REGULARIZERS", "regularizer_loss"]

REGULARIZERS = ("cc", "kl", "none")


def regularizer_loss(
    kind: str,
    reference: tuple[torch.Tensor, torch.Tensor],
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor,
    guidance: float,
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    x0: torch.Tensor,
) -> torch.Tensor:
    """The regulariser ``kind`` (``cc`` or ``kl``) of one step.

    Args:
        kind: ``cc`` or ``kl``.
        reference: The reference model's (unconditional, conditional) noise predictions at
            ``x_t``, (B, C, h, w) each, computed without gradients.
        x_t: The latents at the step, (B, C, h, w).
        alpha_bar: ``a_t`` (scalar tensor, fp32).
        guidance: The classifier-free guidance scale of the sampler.
        eps_uncond, eps_cond: The fine-tuned model's predictions at ``x_t``.
        x0: The fine-tuned model's guided one-step prediction.
    """
    ref_u, ref_c = (r.float() for r in reference)  # schedule arithmetic in fp32
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float32, device=ref_u.device)
    if kind == "cc":
        return consistent_condition_loss(eps_uncond, eps_cond, ref_u, ref_c, alpha_bar)
    if kind == "kl":
        ref_eps = ref_u + guidance * (ref_c - ref_u)
        ref_x0 = (x_t.float() - (1 - alpha_bar).sqrt() * ref_eps) / alpha_bar.sqrt()
        return one_step_kl_loss(x0.float(), ref_x0)
    raise ValueError(f"regularizer: one of {REGULARIZERS[:2]} here; got {kind!r}")
