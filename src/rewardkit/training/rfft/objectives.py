"""RFFT rewards: what the fine-tuned generator is pushed towards.

``rfnet``: F_AC, cross-entropy towards Available under one or more RFNet inspectors;
``social``: the negative Social Reward score. Both take the decoded one-step prediction
(pasted back) and the batch's jobs, and return (loss per image, reward per image).
``to(device)`` moves their frozen models (and cached product tensors) beside the generator;
the RFFT step calls it with the trainee's device.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rewardkit.generation.recurrent import (
    AVAILABLE,
    ProductJob,
    products_on_white,
)

REWARDS = ("rfnet", "social")


class RFNetObjective:
    """F_AC: cross-entropy towards Available under one or more RFNet inspectors (frozen).

    With several inspectors the loss is the mean of their ``-log P(Available)``; with
    ``views > 1`` each image is also judged in ``views - 1`` jittered copies (shifted by up to
    ``shift`` pixels, light noise) and the losses averaged. Both make the reward harder to
    satisfy with pixel patterns one network happens to like (reward hacking), at the cost of
    more inspector passes per step.
    """

    name = "rfnet"
    metric = "p_available"
    takes_rng = True

    def __init__(self, inspector, views: int = 1, shift: int = 2, noise: float = 0.02) -> None:
        inspectors = list(inspector) if isinstance(inspector, (list, tuple)) else [inspector]
        if not inspectors:
            raise ValueError("RFNetObjective: at least one inspector")
        if views < 1:
            raise ValueError(f"views: must be >= 1; got {views}")
        self.inspectors = [i.eval().requires_grad_(False) for i in inspectors]
        # Averaging needs one input size and one class order.
        kinds = {(int(i.rfnet.config.resolution), tuple(i.classes)) for i in self.inspectors}
        if len(kinds) != 1:
            raise ValueError(f"RFNet ensemble: inspectors differ in resolution or classes {kinds}")
        self.size, classes = kinds.pop()
        self.classes = list(classes)
        self.views, self.shift, self.noise = views, shift, noise
        self._products: dict[str, torch.Tensor] = {}  # (3, S, S) on the inspectors' device
        # Early-fusion inspectors: the product as placed (4, S, S), keyed by product and fill.
        self._placed: dict[tuple[str, float | None], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.inspectors[0].device

    def to(self, device: str | torch.device) -> RFNetObjective:
        """Move the inspectors and the cached product tensors to ``device``."""
        device = torch.device(device)
        if self.device != device:
            self.inspectors = [i.to(device) for i in self.inspectors]
            self._products = {k: v.to(device) for k, v in self._products.items()}
            self._placed = {k: v.to(device) for k, v in self._placed.items()}
        return self

    def _placement(self, jobs: list[ProductJob]):
        """``placed`` and ``heights`` for early-fusion inspectors (None, None otherwise)."""
        first = next((i for i in self.inspectors if i.uses_placement), None)
        if first is None:
            return None, None
        for j in jobs:
            if (j.product_key, j.fill) not in self._placed:
                placed, _ = first.placement_inputs([j.photo], [j.fill], [j.height_cm])
                if placed is not None:
                    self._placed[(j.product_key, j.fill)] = placed[0].to(self.device)
        placed = None
        if self._placed:
            placed = torch.stack([self._placed[(j.product_key, j.fill)] for j in jobs])
        heights = torch.tensor([float(j.height_cm) for j in jobs], device=self.device)
        return placed, heights

    def _product(self, job: ProductJob) -> torch.Tensor:
        # keyed by content: two folders may both hold a 000000.png
        if job.product_key not in self._products:
            photo = products_on_white([job.photo], self.size)[0]
            self._products[job.product_key] = photo.to(self.device)
        return self._products[job.product_key]

    def _inputs(self, images: torch.Tensor, jobs: list[ProductJob]):
        p = torch.stack([self._product(j) for j in jobs]).to(images.device, images.dtype)
        g = images
        if g.shape[-1] != self.size:
            g = F.interpolate(g, size=(self.size, self.size), mode="bilinear", antialias=True)
        return p, g

    def _jitter(self, g: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """A copy shifted by up to ``shift`` pixels (edges replicated) with light noise."""
        s = self.shift
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=rng))
        padded = F.pad(g, (s, s, s, s), mode="replicate")
        out = padded[..., s + dy : s + dy + g.shape[-2], s + dx : s + dx + g.shape[-1]]
        noise = torch.randn(g.shape, generator=rng, dtype=g.dtype).to(g.device)
        return (out + self.noise * noise).clamp(0, 1)

    def __call__(
        self, images: torch.Tensor, jobs: list[ProductJob], rng: torch.Generator | None = None
    ):
        p, g = self._inputs(images, jobs)
        captions = [j.caption for j in jobs]
        placed, heights = self._placement(jobs)
        views = [g] + [self._jitter(g, rng) for _ in range(self.views - 1)]
        logp = torch.stack([
            i.available_log_prob(p, v, captions, placed, heights)
            for i in self.inspectors for v in views
        ]).mean(0)  # fmt: skip
        return -logp, logp.exp()

    def classify(self, images: torch.Tensor, jobs: list[ProductJob]):
        """One forward without gradients: (verdicts, P(Available)) per image; an ensemble's
        class probabilities are averaged."""
        p, g = self._inputs(images, jobs)
        captions = [j.caption for j in jobs]
        placed, heights = self._placement(jobs)
        with torch.no_grad():
            probs = torch.stack(
                [torch.softmax(i(p, g, captions, placed, heights), dim=-1)
                 for i in self.inspectors]
            ).mean(0)  # fmt: skip
        # Verdicts at the first inspector's operating point.
        return self.inspectors[0].verdicts(probs), probs[:, self.classes.index(AVAILABLE)]


class SocialObjective:
    """The negative Social Reward score of the image for its prompt (frozen model)."""

    name = "social"
    metric = "social_score"

    def __init__(self, model) -> None:
        self.model = model.eval().requires_grad_(False)

    def to(self, device: str | torch.device) -> SocialObjective:
        """Move the Social Reward model to ``device``."""
        if self.model.device != torch.device(device):
            self.model.to(device)
        return self

    def __call__(self, images: torch.Tensor, jobs: list[ProductJob]):
        score = self.model(images, [j.prompt for j in jobs])
        return -score, score


def load_objective(kind: str, folder: str | Path | None, views: int = 1):
    """``rfnet`` (an inspector folder, or several joined by commas: an ensemble) or ``social``
    (a Social Reward folder); None: embedded. ``views``: jittered views per image (RFNet)."""
    from rewardkit.models.defaults import default_model_path

    if kind == "rfnet":
        from rewardkit.models.inspector import Inspector

        folders = [f for f in (folder or "").split(",") if f] or [default_model_path("rfnet")]
        return RFNetObjective([Inspector.from_pretrained(f) for f in folders], views=views)
    if kind == "social":
        from rewardkit.models.social_reward import SocialReward

        path = folder or default_model_path("social-reward")
        return SocialObjective(SocialReward.from_pretrained(path))
    raise ValueError(f"reward: one of {REWARDS}; got {kind!r}")


def parse_reward(spec: str) -> tuple[str, str | None]:
    """``rfnet``, ``social``, ``rfnet:DIR[,DIR...]`` or ``social:DIR`` -> (kind, folder(s) or
    None)."""
    kind, _, folder = spec.partition(":")
    if kind not in REWARDS:
        raise ValueError(f"--reward: expected rfnet[:DIR[,DIR...]] or social[:DIR]; got {spec!r}")
    return kind, folder or None
