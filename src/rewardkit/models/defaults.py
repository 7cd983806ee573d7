"""The embedded default models shipped inside the package, by scorer name.

=================  ======================================================================
name               folder under ``rewardkit/assets/models`` and how it was made
=================  ======================================================================
clip-score         ``dual-encoder``: small CLIP vision tower + all-MiniLM-L6-v2, trained
                   contrastively on AdWorld image-caption pairs (our "pretrained CLIP")
social-reward      ``social-reward``: the same, reward-tuned with the triplet loss on pairs
                   curated from a simulated community's remix logs
aesthetic          ``aesthetic``: a linear head on the dual encoder's image embeddings,
                   fitted to a generic photo-aesthetic rating (not the community's taste)
depth              ``depth``: a small DPT trained on AdWorld's ground-truth depth maps
saliency           ``saliency``: a small Segformer trained on AdWorld's saliency maps
rfnet              ``rfnet``: the inspector, early fusion of aligned inputs
                   (``RFNetConfig.aligned``: the generated image with the product as placed
                   and its mask in one CNN, the photo, the height), trained on 7,000
                   oracle-labelled generated images; accept threshold at 90% Available
                   precision on its validation split (since 2026-12-03)
rfnet-paper        ``rfnet-paper``: the paper's RFNet (small ResNet, all five inputs, late
                   fusion): ``rfnet-renders`` fine-tuned on 5,000 of those images (the
                   ``rfnet`` shipped on 2026-12-03 before the early-fusion one)
rfnet-renders      ``rfnet-renders``: the paper's RFNet trained on renders only (the
                   ``rfnet`` shipped before 2026-12-02; its ``ablation.md``)
rfnet-image-only   ``rfnet-image-only``: the render-trained backbone on the generated image
                   alone (the paper's baseline)
generator          ``generator``: the small SD + ControlNet inpainting generator
generator-rfft     ``generator-rfft``: its UNet and ControlNet fine-tuned by RFFT (RFNet +
                   CC + KL); those two are stored, the VAE and text encoder come from
                   ``generator``
generator-social   ``generator-social``: the same with Social Reward as the reward
=================  ======================================================================

``recipes/train_default_models.py`` rebuilds the first three,
``recipes/train_modality_models.py`` the depth and saliency models and
``recipes/train_rfnet_models.py`` the inspectors; ``MODELS.md`` beside them records the
data, settings and measured results. Users point every command at their own folders instead.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["DEFAULT_MODELS", "default_model_path"]

DEFAULT_MODELS: dict[str, str] = {
    "clip-score": "dual-encoder",
    "social-reward": "social-reward",
    "aesthetic": "aesthetic",
    "depth": "depth",
    "saliency": "saliency",
    "rfnet": "rfnet",
    "rfnet-paper": "rfnet-paper",
    "rfnet-renders": "rfnet-renders",
    "rfnet-image-only": "rfnet-image-only",
    "generator": "generator",
    "generator-rfft": "generator-rfft",
    "generator-social": "generator-social",
}


def default_model_path(name: str) -> Path:
    """The shipped folder of the embedded default scorer ``name``.

    Raises:
        ValueError: ``name`` has no embedded default.
        FileNotFoundError: The package was installed without the shipped weights.
    """
    if name not in DEFAULT_MODELS:
        raise ValueError(
            f"no embedded default for scorer {name!r}; defaults exist for "
            f"{', '.join(sorted(DEFAULT_MODELS))} (pass a model folder instead)"
        )
    folder = Path(str(resources.files("rewardkit"))) / "assets" / "models" / DEFAULT_MODELS[name]
    markers = ("config.json", "aesthetic.json", "model_index.json")
    if not any((folder / m).is_file() for m in markers):
        raise FileNotFoundError(
            f"{folder}: the embedded default {name!r} is missing from this installation; "
            "rebuild it with `python recipes/train_default_models.py` or pass a model folder"
        )
    return folder
