"""``rewardkit generate``: product photos in, ad images out, optionally until accepted.

Outputs are described in :mod:`rewardkit.generation.run` (``write_result``); this module
decides the judge (RFNet inspector, AdWorld's oracle, or none) and runs Recurrent
Generation over the jobs ``load_jobs`` reads, on ``device`` at ``mixed_precision``
(:mod:`rewardkit.commands.devices`: the generator's weights in that dtype, the inspector
under autocast).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from rewardkit.commands.devices import autocast, precision_dtype
from rewardkit.generation.pipeline import AdGenerator, SamplerConfig
from rewardkit.generation.recurrent import InspectorJudge, OracleJudge, recurrent_generate
from rewardkit.generation.run import load_jobs, write_result
from rewardkit.io import write_json_atomic

__all__ = ["generate_command"]


class _AcceptAll:
    name = "none"

    def __call__(self, images, prompts, **context):
        import torch

        return ["Available"] * images.shape[0], torch.ones(images.shape[0])


def generate_command(
    generator: str | Path,
    products: str | Path,
    out: str | Path,
    prompt: str | None = None,
    prompts_file: str | Path | None = None,
    until_accepted: bool = False,
    judge: str = "inspector",
    inspector: str | Path | None = None,
    max_attempts: int = 8,
    batch_size: int = 16,
    sampler: SamplerConfig | None = None,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    mixed_precision: str = "no",
) -> dict:
    """``rewardkit generate`` (module docstring); returns the stats written to
    ``stats.json``."""
    sampler = sampler if sampler is not None else SamplerConfig()
    gen = AdGenerator.from_pretrained(generator, device, precision_dtype(mixed_precision))
    jobs, skipped = load_jobs(products, gen.resolution, prompt, prompts_file, limit=limit)
    if until_accepted:
        if judge == "oracle":
            if any(j.height_cm != j.height_cm for j in jobs):  # NaN: no size known
                raise ValueError("--judge oracle needs each product's height (manifest or caption)")
            accept = OracleJudge()
        elif judge == "inspector":
            from rewardkit.models.defaults import default_model_path
            from rewardkit.models.inspector import Inspector

            accept = InspectorJudge(
                Inspector.from_pretrained(inspector or default_model_path("rfnet"), device)
            )
        else:
            raise ValueError(f"--judge: 'inspector' or 'oracle'; got {judge!r}")
    else:
        accept = _AcceptAll()
    bar = tqdm(total=len(jobs), desc="generate", unit="product", disable=not progress)

    def tick(done: int, total: int) -> None:
        bar.update(done - bar.n)

    with autocast(device, mixed_precision):
        result = recurrent_generate(
            gen, jobs, accept, sampler, max_attempts if until_accepted else 1, batch_size,
            seed, progress=tick,
        )  # fmt: skip
    bar.close()
    out = Path(out)
    stats = write_result(out, jobs, result, judged=until_accepted)
    stats.update({"judge": accept.name, "skipped": skipped, "sampler": asdict(sampler),
                  "device": str(gen.device), "mixed_precision": mixed_precision})  # fmt: skip
    write_json_atomic(out / "stats.json", stats)
    return stats
