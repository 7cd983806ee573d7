"""Every image scorer behind one entry point, :func:`create_scorer`.

All scorers share the reward signature ``scorer(images [B,3,H,W] in [0,1], prompts) -> [B]``
and are differentiable with respect to the images (their own weights are frozen by
:func:`create_scorer`), so scoring, the accept loop and reward fine-tuning can use any of
them. Weights always come from local folders (or an already cached hub id).

=================  =======================================================================
name               what it scores
=================  =======================================================================
social-reward      cosine(prompt, image) of a (tuned) dual encoder: :class:`SocialReward`
clip-score         the same with an untuned pre-trained dual encoder
pickscore          ``logit_scale.exp() * cosine`` of a CLIPModel (PickScore's formula)
aesthetic          a head on the normalised image embedding of a frozen dual encoder
laion-aesthetic    LAION's improved aesthetic predictor: CLIP image embedding -> MLP
=================  =======================================================================

An aesthetic folder holds ``aesthetic.json`` (head kind, sizes, a pointer to the backbone
folder, relative to the aesthetic folder when inside it) and ``aesthetic_head.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel

from rewardkit.io import default_permissions
from rewardkit.models.social_reward import SocialReward

__all__ = [
    "AestheticPredictor",
    "DualEncoderScorer",
    "Scorer",
    "available_scorers",
    "create_scorer",
    "fit_aesthetic_head",
    "fit_linear_head",
    "laion_mlp_head",
    "register_scorer",
]

AESTHETIC_CONFIG = "aesthetic.json"
AESTHETIC_WEIGHTS = "aesthetic_head.safetensors"
HEAD_KINDS = ("linear", "laion-mlp")
LAION_HIDDEN = (1024, 128, 64, 16)  # LAION's improved aesthetic predictor at CLIP-L (768-d)
LAION_DROPOUT = (0.2, 0.2, 0.1)


class Scorer(nn.Module):
    """Base class: a named image scorer with the shared reward signature.

    Subclasses implement ``forward(images, prompts, **context) -> (B,)``.
    """

    name: str = "scorer"
    lower_better: bool = False

    def forward(self, images: torch.Tensor, prompts: list[str], **context) -> torch.Tensor:
        """Scores (B,) for images (B, 3, H, W) in [0, 1] and one prompt per image."""
        raise NotImplementedError

    @torch.no_grad()
    def score_batch(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        """Score many images without gradients, in chunks.

        Args:
            images: Float tensor (N, 3, H, W) in [0, 1] (any device).
            prompts: One prompt per image; ``None`` means empty prompts.
            batch_size: Images per forward pass.

        Returns:
            Scores, float32 on CPU, shape (N,).
        """
        prompts = [""] * images.shape[0] if prompts is None else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self(images[i : i + batch_size], prompts[i : i + batch_size]).float().cpu()
                for i in range(0, images.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.zeros(0)


class DualEncoderScorer(Scorer):
    """Prompt-image similarity of a dual encoder.

    Args:
        reward: The dual encoder.
        name: Registry name reported by the scorer.
        scale_by_logit: Multiply the cosine by ``logit_scale.exp()`` (PickScore's score).
    """

    def __init__(self, reward: SocialReward, name: str, scale_by_logit: bool = False) -> None:
        super().__init__()
        self.reward = reward
        self.name = name
        self.scale_by_logit = scale_by_logit

    def forward(self, images: torch.Tensor, prompts: list[str], **context) -> torch.Tensor:
        cosine = self.reward(images, prompts)  # (B,)
        if self.scale_by_logit:
            return self.reward.model.logit_scale.exp().float() * cosine
        return cosine


def laion_mlp_head(input_dim: int, hidden: Sequence[int] = LAION_HIDDEN) -> nn.Sequential:
    """LAION's improved aesthetic predictor MLP (linear layers with dropout, no activations).

    With the default widths the module indices (0, 2, 4, 6, 7) match LAION's ``layers.*``
    state dict, so its published weights load after conversion to safetensors.
    """
    layers: list[nn.Module] = []
    width = input_dim
    for i, h in enumerate(hidden):
        layers.append(nn.Linear(width, h))
        if i < len(LAION_DROPOUT):
            layers.append(nn.Dropout(LAION_DROPOUT[i]))
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class _LaionHead(nn.Module):
    """Wrapper so the state dict reads ``layers.N.*``, as LAION's checkpoint does."""

    def __init__(self, input_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.layers = laion_mlp_head(input_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _make_head(kind: str, input_dim: int, hidden: Sequence[int]) -> nn.Module:
    if kind == "linear":
        return nn.Linear(input_dim, 1)
    if kind == "laion-mlp":
        return _LaionHead(input_dim, hidden)
    raise ValueError(f"unknown head kind {kind!r}; expected one of {HEAD_KINDS}")


class AestheticPredictor(Scorer):
    """A frozen dual encoder's normalised image embedding -> head -> score (prompt ignored).

    Args:
        backbone: The dual encoder whose image embedding feeds the head.
        head: Maps (B, D) -> (B, 1); ``_make_head`` builds the supported kinds.
        head_kind: ``"linear"`` or ``"laion-mlp"``.
        backbone_path: Where the backbone lives on disk (written as the pointer on save).
        hidden: Hidden widths of a ``"laion-mlp"`` head.
        name: Registry name reported by the scorer.
    """

    def __init__(
        self,
        backbone: SocialReward,
        head: nn.Module,
        head_kind: str = "linear",
        backbone_path: str | Path | None = None,
        hidden: Sequence[int] = LAION_HIDDEN,
        name: str = "aesthetic",
    ) -> None:
        super().__init__()
        if head_kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {head_kind!r}; expected one of {HEAD_KINDS}")
        self.backbone = backbone
        self.head = head.to(backbone.device)
        self.head_kind = head_kind
        self.backbone_path = None if backbone_path is None else str(backbone_path)
        self.hidden = tuple(int(h) for h in hidden)
        self.name = name

    @property
    def input_dim(self) -> int:
        """Width of the backbone's image embedding (its projection dim)."""
        return int(self.backbone.model.config.projection_dim)

    @classmethod
    def from_backbone(
        cls,
        backbone_path: str | Path,
        head_kind: str = "linear",
        hidden: Sequence[int] = LAION_HIDDEN,
        device: str | torch.device | None = None,
        seed: int = 0,
    ) -> AestheticPredictor:
        """A new, untrained head on a dual encoder loaded from ``backbone_path``."""
        backbone = SocialReward.from_pretrained(backbone_path, device=device)
        dim = int(backbone.model.config.projection_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = _make_head(head_kind, dim, hidden)
        name = "laion-aesthetic" if head_kind == "laion-mlp" else "aesthetic"
        return cls(backbone, head, head_kind, backbone_path, hidden, name)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        backbone: str | Path | None = None,
        device: str | torch.device | None = None,
    ) -> AestheticPredictor:
        """Load an aesthetic folder (``aesthetic.json`` + ``aesthetic_head.safetensors``).

        Args:
            path: The aesthetic folder.
            backbone: Overrides the backbone pointer stored in ``aesthetic.json``.
            device: Where to put the model.

        Raises:
            FileNotFoundError: A required file is missing.
            ValueError: The config or head weights do not match.
        """
        folder = Path(path)
        for required in (AESTHETIC_CONFIG, AESTHETIC_WEIGHTS):
            if not (folder / required).is_file():
                raise FileNotFoundError(f"{folder}: missing {required} (not an aesthetic folder)")
        try:
            meta = json.loads((folder / AESTHETIC_CONFIG).read_text())
            kind, dim = meta["head"], int(meta["input_dim"])
            hidden = tuple(meta.get("hidden", LAION_HIDDEN))
            pointer = backbone or meta["backbone"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{folder / AESTHETIC_CONFIG}: invalid ({err!r})") from err
        pointer_path = Path(pointer)
        if backbone is None and not pointer_path.is_absolute():
            pointer_path = folder / pointer_path
        reward = SocialReward.from_pretrained(
            pointer_path if pointer_path.exists() else str(pointer), device=device
        )
        if int(reward.model.config.projection_dim) != dim:
            raise ValueError(
                f"{folder}: head expects {dim}-d embeddings but backbone {pointer} gives "
                f"{reward.model.config.projection_dim}-d"
            )
        head = _make_head(kind, dim, hidden)
        state = load_file(str(folder / AESTHETIC_WEIGHTS))
        missing, unexpected = head.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder / AESTHETIC_WEIGHTS}: missing {missing}, unexpected {unexpected}"
            )
        name = "laion-aesthetic" if kind == "laion-mlp" else "aesthetic"
        return cls(reward, head, kind, pointer, hidden, name).eval()

    def save_pretrained(self, path: str | Path) -> Path:
        """Save the head and a pointer to the backbone; the backbone itself goes to
        ``path/backbone`` when it has no folder of its own yet."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        pointer = self.backbone_path
        if pointer is None:
            self.backbone.save_pretrained(folder / "backbone")
            pointer = self.backbone_path = "backbone"
        state = {
            k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()
        }
        tmp = folder / f".{AESTHETIC_WEIGHTS}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        default_permissions(tmp)
        tmp.replace(folder / AESTHETIC_WEIGHTS)
        meta = {
            "format": "rewardkit-aesthetic",
            "head": self.head_kind,
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "backbone": pointer,
        }
        tmp = folder / f".{AESTHETIC_CONFIG}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        tmp.replace(folder / AESTHETIC_CONFIG)
        return folder

    def forward(
        self, images: torch.Tensor, prompts: list[str] | None = None, **context
    ) -> torch.Tensor:
        """Scores (B,) from the image alone; ``prompts`` is accepted for the shared signature."""
        emb = self.backbone.embed_images(images)  # (B, D), L2-normalised as LAION's
        return self.head(emb.to(next(self.head.parameters()).dtype)).squeeze(-1)  # (B,)


def fit_linear_head(
    embeddings: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``targets ~ embeddings @ w + b`` in closed form (bias unpenalised).

    Args:
        embeddings: (N, D) features.
        targets: (N,) values.
        l2: Ridge penalty on ``w``.

    Returns:
        ``(w, b)``: weight (D,) and bias (scalar tensor), float32.
    """
    if embeddings.ndim != 2 or targets.shape != (embeddings.shape[0],):
        raise ValueError(
            f"expected embeddings (N, D) and targets (N,); got {tuple(embeddings.shape)} "
            f"and {tuple(targets.shape)}"
        )
    x = embeddings.double()  # (N, D)
    y = targets.double()  # (N,)
    x_mean, y_mean = x.mean(0), y.mean()  # (D,), ()
    xc, yc = x - x_mean, y - y_mean  # (N, D), (N,)
    gram = xc.T @ xc + l2 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)  # (D, D)
    w = torch.linalg.solve(gram, xc.T @ yc)  # (D,)
    b = y_mean - x_mean @ w  # ()
    return w.float(), b.float()


def fit_aesthetic_head(
    scorer_backbone: SocialReward,
    images: torch.Tensor | Iterable[torch.Tensor],
    targets: torch.Tensor,
    l2: float = 1e-3,
    batch_size: int = 64,
    backbone_path: str | Path | None = None,
) -> AestheticPredictor:
    """Fit a linear aesthetic head on a frozen backbone's image embeddings (ridge).

    Args:
        scorer_backbone: The dual encoder whose normalised image embeddings are the features.
        images: (N, 3, H, W) in [0, 1], or an iterable of such batches.
        targets: (N,) aesthetic/appeal values to regress.
        l2: Ridge penalty.
        batch_size: Chunk size when ``images`` is a single tensor.
        backbone_path: The backbone's folder, recorded for ``save_pretrained``.

    Returns:
        An :class:`AestheticPredictor` with the fitted linear head.
    """
    if isinstance(images, torch.Tensor):
        images = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
    with torch.no_grad():
        emb = torch.cat([scorer_backbone.embed_images(b).cpu() for b in images])  # (N, D)
    w, b = fit_linear_head(emb, targets.detach().cpu().float(), l2)
    head = nn.Linear(emb.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(w.unsqueeze(0))  # (1, D)
        head.bias.copy_(b.reshape(1))
    return AestheticPredictor(scorer_backbone, head, "linear", backbone_path)


# ---------------------------------------------------------------------------------------
# Registry.

_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: register a factory ``(path, **kw) -> Scorer`` under ``name``."""

    def decorate(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_scorers() -> list[str]:
    """Names accepted by :func:`create_scorer`."""
    return sorted(_REGISTRY)


def create_scorer(name: str, path: str | Path | None = None, **kw) -> Scorer:
    """Build a registered scorer from local weights, frozen and in eval mode.

    Args:
        name: One of :func:`available_scorers`.
        path: The scorer's folder (a dual encoder folder, or an aesthetic folder).
        **kw: Passed to the factory (``device``, ``dtype``, ``backbone``, ...).

    Raises:
        ValueError: Unknown name or no path.
        FileNotFoundError: Missing files (the message names the path).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(available_scorers())}")
    if path is None:
        raise ValueError(f"scorer {name!r} needs a path to a local folder with its weights")
    scorer = _REGISTRY[name](path, **kw)
    scorer.requires_grad_(False)
    return scorer.eval()


@register_scorer("social-reward")
def _social_reward(path: str | Path, **kw) -> Scorer:
    return DualEncoderScorer(SocialReward.from_pretrained(path, **kw), "social-reward")


@register_scorer("clip-score")
def _clip_score(path: str | Path, **kw) -> Scorer:
    return DualEncoderScorer(SocialReward.from_pretrained(path, **kw), "clip-score")


@register_scorer("pickscore")
def _pickscore(path: str | Path, **kw) -> Scorer:
    reward = SocialReward.from_pretrained(path, **kw)
    if not isinstance(reward.model, CLIPModel):
        raise ValueError(f"{path}: PickScore is a CLIPModel; got {type(reward.model).__name__}")
    return DualEncoderScorer(reward, "pickscore", scale_by_logit=True)


@register_scorer("aesthetic")
def _aesthetic(path: str | Path, **kw) -> Scorer:
    return AestheticPredictor.from_pretrained(path, **kw)


@register_scorer("laion-aesthetic")
def _laion_aesthetic(path: str | Path, **kw) -> Scorer:
    predictor = AestheticPredictor.from_pretrained(path, **kw)
    if predictor.head_kind != "laion-mlp":
        raise ValueError(f"{path}: laion-aesthetic needs a 'laion-mlp' head; got a linear one")
    return predictor
