"""RFFT step cost: truncated + checkpointed backprop vs full backprop. Prints JSON.

    python benchmarks/bench_rfft.py [--batch-size 2] [--steps 40] [--repeats 2]
        [--generator DIR] [--modes rfft,last10-ckpt,full,full-ckpt] [--device cpu|cuda]

One optimiser step of reward fine-tuning (the RFNet reward, F_AC, on the decoded image; the
ControlNet trainable), in four ways:

- ``rfft``: RFFT as published: the run without gradients up to a step t among the last 10,
  gradients through that one step (checkpointed), x0_hat decoded;
- ``last10-ckpt``: gradients through the last 10 steps, each checkpointed, final image;
- ``full``: gradients through all ``steps`` steps, activations stored (AlignProp without
  truncation or checkpointing);
- ``full-ckpt``: all steps, each checkpointed.

Each mode runs in its own process. Memory: the peak (CUDA ``max_memory_allocated``; on CPU
the process's peak resident set, ``ru_maxrss``) and ``step_memory_mib``, the peak minus its
value once models and data are loaded: what a training step needs on top of the weights.
Time: seconds per step (mean of ``repeats`` after one warm-up step).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("rfft", "last10-ckpt", "full", "full-ckpt")


def _one(mode: str, a: argparse.Namespace) -> dict:
    import torch

    from rewardkit.generation.pipeline import (
        AdGenerator,
        denoise,
        paste_back_tensor,
        prepare_batch,
    )
    from rewardkit.generation.run import load_jobs, sampler_for
    from rewardkit.models.defaults import default_model_path
    from rewardkit.training.rfft import RFFTTrainee, load_objective, rfft_loss
    from rewardkit.world.export import render_world

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    folder = a.generator or default_model_path("generator")
    gen = AdGenerator.from_pretrained(folder, device=dev)
    sampler = sampler_for(folder, a.steps)
    objective = load_objective("rfnet", a.inspector)
    for inspector in objective.inspectors:
        inspector.to(dev)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        render_world(tmp, n=a.batch_size, seed=404, balance={"Available": 1.0})
        jobs, _ = load_jobs(tmp, gen.resolution)
    trainee = RFFTTrainee(gen, "controlnet")
    opt = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=1e-5)
    batch = prepare_batch(
        gen, [j.prepared for j in jobs], [j.prompt for j in jobs], list(range(len(jobs)))
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if mode == "rfft":
            loss, _ = rfft_loss(
                gen, trainee, batch, jobs, objective, sampler, sampler.steps - 5, "none", 0.0,
                grad_checkpoint_step=True,
            )  # fmt: skip
        else:
            k = 10 if mode == "last10-ckpt" else sampler.steps
            lat = denoise(gen, batch, sampler, grad_last=k, checkpoint=mode != "full").latents
            images = paste_back_tensor(gen.decode_latents(lat), batch)
            loss = objective(images, jobs)[0].mean()
        loss.backward()
        opt.step()

    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # models and data only
    if dev.type == "cuda":
        torch.cuda.synchronize()
        loaded_cuda = torch.cuda.max_memory_allocated()
    step()  # warm-up (allocator, lazy init); counted in the peak
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / a.repeats
    out = {"mode": mode, "seconds_per_step": round(sec, 3)}
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        out["peak_memory_mib"] = round(peak / 2**20, 1)
        out["step_memory_mib"] = round((peak - loaded_cuda) / 2**20, 1)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out["peak_rss_mib"] = round(peak / 1024, 1)
        out["step_memory_mib"] = round((peak - loaded_rss) / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--generator", default=None)
    ap.add_argument("--inspector", default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_one(a.child, a)))
        return
    rows = []
    for mode in a.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r} (known: {', '.join(MODES)})")
        cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            rows.append({"mode": mode, "error": res.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(json.dumps({"batch_size": a.batch_size, "steps": a.steps, "device": a.device,
                      "modes": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
