"""RFFT: reward fine-tuning of the ad generator, with Consistent Condition regularisation.

One optimiser step (``../shared/MISSION.md``, Part B; the paper's section on RFFT):

1. A batch of products (photo, prompt, caption) and fresh seeds; a DDIM run of
   ``sample_steps`` steps (40) with the *fine-tuned* model, without gradients, up to a step
   ``t`` drawn at random among the last ``grad_window`` (10).
2. At ``t``, with gradients: the fine-tuned model's conditional and unconditional noise
   predictions ``eps(x_t, z, c)`` and ``eps(x_t, c)`` (``z`` the prompt, ``c`` the product's
   ControlNet and inpainting conditions), classifier-free guidance, and the one-step
   prediction ``x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, decoded by the VAE and
   pasted back around the product (what a judge sees).
3. The reward loss on that image: ``F_AC = -log P(Available)`` under RFNet (``rfnet``), or
   the negative Social Reward score (``social``).
4. The regulariser against the frozen reference model at the same ``x_t``:

   - ``cc``: ``L_CC = ||g_theta - g_ref||^2``, with ``g = -(eps(x_t, z, c) - eps(x_t, c)) /
     sqrt(1 - a_t)`` the implicit classifier's gradient ``grad log p(z | x_t, c)``: the
     direction the prompt pulls the sample in (squared L2, averaged over latent elements);
   - ``kl``: the KL divergence between the two models' one-step predictions
     ``p(x0_hat | x_t, z, c)``, Gaussians with a shared variance, i.e. up to that variance
     ``||x0_hat_theta - x0_hat_ref||^2`` (averaged over latent elements);
   - ``none``: nothing (ReFL-like).

   ``F_total = F + beta * L``.
5. Optionally (``replay``), ReFL's other half: the diffusion model's own denoising loss on a
   replay set of images the same reward ranks highest (:func:`select_replay`: the top
   ``replay_top`` of a manifest of images with their products and prompts: a ``rewardkit
   generate`` output, or the generator's own training renders, which the inspector judges
   far more reliably than generated images), so the fine-tuned model also learns the scenes
   the reward accepts from samples rather than only from the reward's gradient, which a weak
   inspector lets it satisfy with patterns it mistakes for a good layout.
   ``F_total = reward_weight * F + beta * L + replay_weight * L_denoise``.

Trainable part: the ControlNet (``controlnet``, as published), LoRA adapters (peft) on the
attention projections of the UNet and the ControlNet (``lora``), or every weight of both
(``all``: the most capacity, and a frozen copy of both as the reference; at the embedded
size that is 5.7 M weights). Everything else is frozen.
The loop is ``training.loop.run_training``: accelerate, AdamW, gradient clipping, checkpoints
with exact resume. Every step logs the reward loss, the regulariser and the reward; every
``probe_every`` steps a fixed probe set (products, prompts, seeds) is generated at the full
sampler and judged by the reward model and, when the products come from an AdWorld manifest,
by the oracle, with the background diversity and appeal (``generation.metrics``); the curves
go to ``curves.csv`` and ``curves.png`` in the run folder.

Output ``<out>/model``: a generator folder holding only the fine-tuned component(s) and a
``rewardkit_generator.json`` naming the base folder, which ``AdGenerator.from_pretrained``
(and so ``rewardkit generate``) loads as a whole pipeline.
"""

from rewardkit.training.rfft.objectives import (
    REWARDS,
    RFNetObjective,
    SocialObjective,
    load_objective,
    parse_reward,
)
from rewardkit.training.rfft.recipe import FinetuneConfig, finetune_generator, probe_generator
from rewardkit.training.rfft.regularizers import REGULARIZERS, regularizer_loss
from rewardkit.training.rfft.replay import score_generated, select_replay
from rewardkit.training.rfft.step import TRAINABLE, RFFTTrainee, rfft_loss

__all__ = [
    "REGULARIZERS",
    "REWARDS",
    "TRAINABLE",
    "FinetuneConfig",
    "RFFTTrainee",
    "RFNetObjective",
    "SocialObjective",
    "finetune_generator",
    "load_objective",
    "parse_reward",
    "probe_generator",
    "regularizer_loss",
    "rfft_loss",
    "score_generated",
    "select_replay",
]
