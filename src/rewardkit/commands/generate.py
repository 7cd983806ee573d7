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

__all__ = ["check_judge", "generate_command", "make_judge"]


class _AcceptAll:
    name = "none"

    def __call__(self, images, prompts, **context):
        import torch

        return ["Available"] * images.shape[0], torch.ones(images.shape[0])


def check_judge(until_accepted: bool, judge: str, jobs) -> None:
    """Refuse a judge that cannot judge these jobs (before any model is loaded)."""
    if not until_accepted:
        return
    if judge not in ("inspector", "oracle"):
        raise ValueError(f"--judge: 'inspector' or 'oracle'; got {judge!r}")
    if judge == "oracle" and any(j.height_cm != j.height_cm for j in jobs):  # NaN: no size
        raise ValueError("--judge oracle needs each product's height (manifest or caption)")


def loop_accept_threshold(
    until_accepted: bool, judge: str, inspector: str | Path | None,
    accept_threshold: float | None,
) -> float | None:  # fmt: skip
    """The P(Available) the loop accepts at, as ``stats.json`` records it: ``accept_threshold``
    when given, else the inspector's ``loop_threshold``, else its operating point (None: the
    most probable class, or no inspector judging)."""
    if accept_threshold is not None or not (until_accepted and judge == "inspector"):
        return accept_threshold
    from rewardkit.models.defaults import default_model_path
    from rewardkit.models.rfnet import RFNetConfig

    return RFNetConfig.from_folder(inspector or default_model_path("rfnet")).loop_accept_threshold


def make_judge(
    until_accepted: bool, judge: str, inspector: str | Path | None, device: str,
    accept_threshold: float | None = None,
):  # fmt: skip
    """The accept test: the RFNet inspector (``inspector``, default: the embedded one) on
    ``device``, at ``accept_threshold`` (default: the model's operating point), AdWorld's
    oracle, or, without ``--until-accepted``, one that accepts all. The local run and each
    Ray actor (``generate --engine ray``) build it here."""
    if accept_threshold is not None and not (until_accepted and judge == "inspector"):
        raise ValueError("--accept-threshold: only with --until-accepted and --judge inspector")
    if not until_accepted:
        return _AcceptAll()
    if judge == "oracle":
        return OracleJudge()
    if judge == "inspector":
        from rewardkit.models.defaults import default_model_path
        from rewardkit.models.inspector import Inspector

        return InspectorJudge(
            Inspector.from_pretrained(inspector or default_model_path("rfnet"), device),
            accept_threshold,
        )
    raise ValueError(f"--judge: 'inspector' or 'oracle'; got {judge!r}")


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
    engine: str = "local",
    ray_address: str | None = None,
    actors: int = 2,
    gpus_per_actor: float = 0.0,
    accept_threshold: float | None = None,
) -> dict:
    """``rewardkit generate`` (module docstring); returns the stats written to
    ``stats.json``.

    ``engine="ray"``: the products are sharded over ``actors`` Ray actors (each loading the
    generator, and the inspector when judging, once; ``gpus_per_actor`` GPUs each, CUDA
    then), each running Recurrent Generation with batched refill on its shard
    (:func:`rewardkit.ray_engine.generate_ray`); the files are the local run's. The returned
    dict adds the run's Ray figures under ``"ray"`` (``stats.json`` has the local keys)."""
    sampler = sampler if sampler is not None else SamplerConfig()
    out = Path(out)
    ray_info = None
    if engine == "ray":
        from rewardkit.generation.pipeline import generator_resolution
        from rewardkit.ray_engine import generate_ray

        size = generator_resolution(generator)
        jobs, skipped = load_jobs(products, size, prompt, prompts_file, limit=limit)
        check_judge(until_accepted, judge, jobs)
        result, used_device, run = generate_ray(
            generator, jobs, out, until_accepted=until_accepted, judge=judge,
            inspector=inspector, accept_threshold=accept_threshold,
            max_attempts=max_attempts, batch_size=batch_size,
            sampler=sampler, seed=seed, address=ray_address, actors=actors,
            gpus_per_actor=gpus_per_actor, mixed_precision=mixed_precision, progress=progress,
        )  # fmt: skip
        judge_name, ray_info = (judge if until_accepted else _AcceptAll.name), run.info()
    elif engine == "local":
        gen = AdGenerator.from_pretrained(generator, device, precision_dtype(mixed_precision))
        jobs, skipped = load_jobs(products, gen.resolution, prompt, prompts_file, limit=limit)
        check_judge(until_accepted, judge, jobs)
        accept = make_judge(until_accepted, judge, inspector, device, accept_threshold)
        bar = tqdm(total=len(jobs), desc="generate", unit="product", disable=not progress)

        def tick(done: int, total: int) -> None:
            bar.update(done - bar.n)

        with autocast(device, mixed_precision):
            result = recurrent_generate(
                gen, jobs, accept, sampler, max_attempts if until_accepted else 1, batch_size,
                seed, progress=tick,
            )  # fmt: skip
        bar.close()
        judge_name, used_device = accept.name, str(gen.device)
    else:
        raise ValueError(f"--engine: 'local' or 'ray'; got {engine!r}")
    stats = write_result(out, jobs, result, judged=until_accepted)
    stats.update({"judge": judge_name, "skipped": skipped, "sampler": asdict(sampler),
                  "device": used_device, "mixed_precision": mixed_precision,
                  "accept_threshold": loop_accept_threshold(
                      until_accepted, judge, inspector, accept_threshold)})  # fmt: skip
    write_json_atomic(out / "stats.json", stats)
    return stats if ray_info is None else {**stats, "ray": ray_info}
