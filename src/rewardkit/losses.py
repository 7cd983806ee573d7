"""Training losses as pure functions: tensors in, scalar tensor out.

Part A (Social Reward):

- :func:`triplet_loss`: prompt anchor, remixed image positive, non-remixed image negative;
  squared Euclidean distance on L2-normalised embeddings, margin 0.3 (the paper's setting).
- :func:`bradley_terry_loss`: the pairwise preference likelihood on scalar scores.
- :func:`contrastive_clip_loss`: symmetric InfoNCE, for contrastive pre-training of a dual
  encoder (the embedded default).

Part B (RFNet cross-entropy F_AC, consistent-condition L_CC, KL) will live here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss", "contrastive_clip_loss", "triplet_loss", "weighted_mean"]


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-sample values, optionally weighted.

    Args:
        values: Per-sample losses, shape (B,).
        weight: Optional non-negative per-sample weights, shape (B,). The result is
            ``sum(w * v) / sum(w)``; an all-zero weight vector gives 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``weight`` does not have the shape of ``values``.
    """
    if weight is None:
        return values.mean()
    weight = weight.to(dtype=values.dtype, device=values.device)
    if weight.shape != values.shape:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}; expected {tuple(values.shape)} "
            "(one weight per sample)"
        )
    return (weight * values).sum() / weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; "
            "expected equal shapes"
        )


def triplet_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.3,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triplet loss on L2-normalised embeddings with squared Euclidean distance.

    ``mean(max(0, ||a - p||^2 - ||a - n||^2 + margin))`` after normalising each row. For unit
    vectors ``||a - b||^2 = 2 - 2 cos(a, b)``, so distances lie in [0, 4].

    Args:
        anchor: Anchor embeddings (the prompt's text embedding), shape (B, D).
        positive: Positive embeddings (the remixed image), shape (B, D).
        negative: Negative embeddings (the non-remixed image), shape (B, D).
        margin: Required gap between the negative and positive distances (paper: 0.3).
        weight: Optional per-triplet weights, shape (B,); gives a weighted mean.

    Returns:
        A scalar tensor.
    """
    _check_pair("anchor", anchor, "positive", positive)
    _check_pair("anchor", anchor, "negative", negative)
    a = F.normalize(anchor, dim=-1)  # (B, D)
    p = F.normalize(positive, dim=-1)  # (B, D)
    n = F.normalize(negative, dim=-1)  # (B, D)
    d_pos = (a - p).pow(2).sum(dim=-1)  # (B,)
    d_neg = (a - n).pow(2).sum(dim=-1)  # (B,)
    per_triplet = F.relu(d_pos - d_neg + margin)  # (B,)
    return weighted_mean(per_triplet, weight)


def bradley_terry_loss(
    score_pos: torch.Tensor,
    score_neg: torch.Tensor,
    weight: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood that the positive beats the negative.

    ``mean(-log sigmoid(scale * (s_pos - s_neg)))``, computed as
    ``softplus(-scale * (s_pos - s_neg))`` so it stays finite for large margins.

    Args:
        score_pos: Scores of the preferred items, shape (B,).
        score_neg: Scores of the other items, shape (B,).
        weight: Optional per-pair weights, shape (B,); gives a weighted mean.
        scale: Multiplier on the score difference (an inverse temperature; use e.g. the
            dual encoder's ``logit_scale.exp()`` when the scores are cosines).

    Returns:
        A scalar tensor.
    """
    _check_pair("score_pos", score_pos, "score_neg", score_neg)
    per_pair = F.softplus(-scale * (score_pos - score_neg))  # (B,)
    return weighted_mean(per_pair, weight)


def contrastive_clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss): row i of each batch is the other's positive.

    Args:
        image_emb: Image embeddings, shape (B, D); normalised here.
        text_emb: Text embeddings, shape (B, D); normalised here.
        logit_scale: The multiplier on cosine similarities, already exponentiated
            (as open_clip passes it: ``model.logit_scale.exp()``), not the log parameter.

    Returns:
        A scalar tensor: the mean of the image->text and text->image cross-entropies.
    """
    _check_pair("image_emb", image_emb, "text_emb", text_emb)
    img = F.normalize(image_emb, dim=-1)  # (B, D)
    txt = F.normalize(text_emb, dim=-1)  # (B, D)
    logits_per_image = logit_scale * img @ txt.t()  # (B, B)
    labels = torch.arange(img.shape[0], device=img.device)  # (B,)
    loss_i = F.cross_entropy(logits_per_image, labels)
    loss_t = F.cross_entropy(logits_per_image.t(), labels)
    return (loss_i + loss_t) / 2


def consistent_condition_loss(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    ref_uncond: torch.Tensor,
    ref_cond: torch.Tensor,
    alpha_bar: torch.Tensor | float,
) -> torch.Tensor:
    """L_CC (RFFT's Consistent Condition regulariser): the squared L2 distance between the
    fine-tuned and the reference model's implicit-classifier gradients
    ``grad log p(z | x_t, c) ~ -(eps(x_t, z, c) - eps(x_t, c)) / sqrt(1 - a_t)``, averaged
    over latent elements.

    Args:
        eps_uncond, eps_cond: The fine-tuned model's noise predictions without and with the
            prompt, shape (B, C, h, w).
        ref_uncond, ref_cond: The frozen reference model's, same shape.
        alpha_bar: ``a_t`` at the step (scalar), fp32 or a float: near 1 late in sampling,
            where bf16 rounds it to 1 (and ``1 - a_t`` to 0).

    Returns:
        A scalar fp32 tensor: computed in fp32 whatever the predictions' dtype.
    """
    _check_pair("eps_cond", eps_cond, "ref_cond", ref_cond)
    direction = (eps_cond.float() - eps_uncond.float()) - (ref_cond.float() - ref_uncond.float())
    a = torch.as_tensor(alpha_bar, device=direction.device)
    if a.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"alpha_bar: pass it in fp32 (a {a.dtype} a_t near 1 rounds 1 - a_t to 0)")
    return direction.pow(2).mean() / (1 - a.float())


def one_step_kl_loss(x0: torch.Tensor, ref_x0: torch.Tensor) -> torch.Tensor:
    """The KL baseline of RFFT: between the two models' one-step predictions
    ``p(x0_hat | x_t, z, c)``, Gaussians with a shared variance, i.e. up to that variance the
    mean squared difference of the predictions (B, C, h, w) -> scalar."""
    _check_pair("x0", x0, "ref_x0", ref_x0)
    return (x0 - ref_x0).pow(2).mean()
