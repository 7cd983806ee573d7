"""Training on several processes: the same weights as one process, one writer, exact resume,
gradient accumulation, one Accelerator per process, validation once at the end.

Resume: a run killed mid-way (right after a checkpoint lands, the process SIGKILLs itself:
``RK_KILL_AT``) and run again with the same command ends with the weights of a run that was
never stopped, bit for bit, in one process and in two. The kill is real rather than a shorter
``--max-steps`` first: RFNet's schedule (lr / 10 from ``lr_drop_at * total``) depends on the
budget, so a 2-step run is not the first half of a 4-step one.

The multi-process runs launch ``rewardkit`` under ``accelerate launch --multi_gpu
--num_processes 2`` on the CPU (gloo). ``accelerate launch --cpu --num_processes 2`` starts a
single process unless mpirun is installed, so the launcher's GPU path is used: without a GPU
the loop joins the processes on the CPU (``training.loop.shared_accelerator``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rewardkit.io import write_folder_atomic
from rewardkit.training.loop import TrainConfigBase, run_training
from rewardkit.training.reward import RewardTrainConfig, train_reward
from tests.models.test_social_reward import make_tiny_clip
from tests.training.test_reward_recipes import _pairs_dataset

BIN = Path(sys.executable).parent

# Logs every rename into the run folder with the process id: the check that one process
# wrote (atomic writes end in a rename, so a second writer shows up here). With RK_KILL_AT=N,
# the process that puts the step-N checkpoint in place SIGKILLs itself right after: a run
# killed mid-way (the other processes are then ended by the launcher).
SITECUSTOMIZE = """
import json, os, signal
_root, _log = os.environ["RK_WRITE_ROOT"], os.environ["RK_WRITE_LOG"]
_kill_at = os.environ.get("RK_KILL_AT")
_rename, _replace = os.rename, os.replace
def _note(dst):
    dst = os.path.abspath(os.fspath(dst))
    if dst.startswith(_root):
        with open(_log, "a") as f:
            f.write(f"{os.getpid()} {os.path.relpath(dst, _root)}\\n")
def _kill(dst):
    ckpt = os.path.join(_root, "checkpoint")
    if _kill_at and os.path.abspath(os.fspath(dst)) == ckpt:
        with open(os.path.join(ckpt, "state.json")) as f:
            if json.load(f)["step"] == int(_kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
def rename(src, dst, *a, **k):
    _note(dst)
    done = _rename(src, dst, *a, **k)
    _kill(dst)
    return done
def replace(src, dst, *a, **k):
    _note(dst)
    done = _replace(src, dst, *a, **k)
    _kill(dst)
    return done
os.rename, os.replace = rename, replace
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return make_tiny_clip(root / "clip"), _pairs_dataset(root / "data")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rewardkit(
    args: list[str], processes: int, tmp: Path, out: Path, kill_at: int | None = None
) -> list[str]:
    """Run ``rewardkit args`` in ``processes`` processes; returns the renames into ``out``
    as ``"pid relative/path"`` lines. ``kill_at``: the run is killed right after its
    checkpoint of that step is in place (it must then fail, and leave that checkpoint)."""
    hook = tmp / f"hook-{out.name}"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp / f"writes-{out.name}-{len(list(tmp.glob('writes-*')))}.log"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "RK_WRITE_ROOT": str(out.resolve()),
        "RK_WRITE_LOG": str(log),
        "RK_KILL_AT": "" if kill_at is None else str(kill_at),
    }
    cmd = [str(BIN / "rewardkit"), *args]
    if processes > 1:
        cmd = [
            str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *cmd,
        ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if kill_at is None:
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        assert done.returncode != 0, done.stdout[-3000:]
        assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == kill_at
        assert not (out / "model").exists()
    return log.read_text().splitlines() if log.is_file() else []


class _Killed(BaseException):
    """Ends a run where a kill would (a BaseException: nothing in the library catches it)."""


@contextmanager
def _killed_at(monkeypatch, out: Path, step: int):
    """In this process: the run writing into ``out`` stops right after its step-``step``
    checkpoint is in place (the in-process form of ``_rewardkit(..., kill_at=step)``)."""
    ckpt = (out / "checkpoint").absolute()

    def after(move):
        def moved(src, dst, *a, **k):
            done = move(src, dst, *a, **k)
            if Path(os.path.abspath(dst)) == ckpt:
                if json.loads((ckpt / "state.json").read_text())["step"] == step:
                    raise _Killed
            return done

        return moved

    with monkeypatch.context() as m:
        m.setattr(os, "rename", after(os.rename))
        m.setattr(os, "replace", after(os.replace))
        with pytest.raises(_Killed):
            yield
    assert not (out / "model").exists()


# Attention key biases get a zero gradient in exact arithmetic (softmax ignores a shift
# shared by every key): AdamW turns the float noise of their sums (~1e-12) into updates of
# up to ~lr * noise / eps, whatever order the sums are taken in. They are left out.
SHIFT_INVARIANT = "k_proj.bias"


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    keys = [k for k in wa if not k.endswith(SHIFT_INVARIANT)]
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in keys)


def _one_writer(writes: list[str], out: Path) -> None:
    """Every write into the run folder came from one process; the summary and the model
    folder were each put in place once; no temp or backup folders are left."""
    assert len({w.split()[0] for w in writes}) == 1, writes
    targets = [w.split(maxsplit=1)[1] for w in writes]
    assert targets.count("train_summary.json") == 1 and targets.count("model") == 1, targets
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


REWARD = ["--preset", "all", "--lr", "3e-3", "--batch-size", "8", "--seed", "0"]


@pytest.mark.slow
def test_reward_two_processes_match_one_and_one_process_writes(tiny, tmp_path):
    model, pairs = tiny
    common = ["train", "reward", "--pairs", str(pairs), "--model", str(model), *REWARD]
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    _rewardkit([*common, "--out", str(o1), "--max-steps", "6"], 1, tmp_path, o1)
    writes = _rewardkit([*common, "--out", str(o2), "--max-steps", "6"], 2, tmp_path, o2)
    weights = "model/model.safetensors"
    # Float sums in another order (gradients all-reduced): 1e-5 is ~100x the observed gap
    # and ~100x below how far the weights moved.
    assert _max_diff(o1 / weights, o2 / weights) <= 1e-5
    assert _max_diff(o1 / weights, model / "model.safetensors") > 1e-3
    _one_writer(writes, o2)
    summary = json.loads((o2 / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    # Resume on two processes: 3 steps, then the full budget, ends where 6 straight steps do.
    o3 = tmp_path / "o3"
    _rewardkit([*common, "--out", str(o3), "--max-steps", "3"], 2, tmp_path, o3)
    assert sorted(p.name for p in (o3 / "checkpoint").glob("rng_rank*")) == [
        "rng_rank0.safetensors", "rng_rank1.safetensors",
    ]  # fmt: skip
    _rewardkit([*common, "--out", str(o3), "--max-steps", "6"], 2, tmp_path, o3)
    assert json.loads((o3 / "train_summary.json").read_text())["resumed_from"] == 3
    assert _max_diff(o2 / weights, o3 / weights) == 0.0


TINY_RFNET = dict(width=32, heads=2, n_fusion=1, resolution=32, dropout=0.0,
                  backbone={"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
                            "layer_type": "basic"})  # fmt: skip


RFNET_WEIGHTS = "model/model.safetensors"


def _rfnet_command(tmp: Path) -> list[str]:
    """``train rfnet`` on a 40-image world: 32 training rows, 4 steps of 8 (one epoch; the
    lr drops at step 2), a checkpoint every 2 steps."""
    from rewardkit.world.export import render_world

    render_world(tmp / "w", 40, seed=3, size=32, progress=False)
    cfg = tmp / "rfnet.yaml"
    cfg.write_text(yaml.safe_dump(TINY_RFNET))
    train = tmp / "train.yaml"
    train.write_text(yaml.safe_dump({"degraded_copy": False, "degrade": 0.5,
                                     "checkpoint_every": 2}))  # fmt: skip
    return ["train", "rfnet", "--manifest", str(tmp / "w" / "manifest.parquet"),
            "--model-config", str(cfg), "--config", str(train), "--maps", "truth",
            "--max-steps", "4", "--batch-size", "8", "--lr", "3e-3"]  # fmt: skip


@pytest.mark.slow
def test_rfnet_two_processes_match_one(tmp_path):
    """RFNet: class-weighted cross-entropy, degraded rows drawn per (step, row), BatchNorm over
    the whole batch. Dropout is 0 here: its masks come from each process's RNG, so with
    dropout two processes agree with one in distribution only. Then a two-process run killed
    after step 2 and run again ends where the uninterrupted one did."""
    common = _rfnet_command(tmp_path)
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    _rewardkit([*common, "--out", str(o1)], 1, tmp_path, o1)
    writes = _rewardkit([*common, "--out", str(o2)], 2, tmp_path, o2)
    weights = RFNET_WEIGHTS
    # BatchNorm statistics are all-reduced in float32 in another order than one process's
    # batch_norm (running statistics included; measured 9e-5): 2e-4. The fusion's attention
    # query/key projections are apart: near-uniform attention at init gives them gradients
    # near zero, which AdamW turns from float noise into updates (measured 1.9e-3 after 4
    # steps at lr 3e-3); they are held to 5e-3.
    wa, wb = load_file(o1 / weights), load_file(o2 / weights)
    gap = {k: float((wa[k].float() - wb[k].float()).abs().max()) for k in wa}
    attention = {k: v for k, v in gap.items() if "self_attn.in_proj" in k}
    assert max(v for k, v in gap.items() if k not in attention) <= 2e-4
    assert max(attention.values()) <= 5e-3
    writers = {w.split()[0] for w in writes}  # checked last: the resume below runs either way
    # Killed right after the step-2 checkpoint (both processes' RNG states in it), the same
    # command again: it resumes at step 2 and ends with the weights of o2, bit for bit.
    o3 = tmp_path / "o3"
    _rewardkit([*common, "--out", str(o3)], 2, tmp_path, o3, kill_at=2)
    assert sorted(p.name for p in (o3 / "checkpoint").glob("rng_rank*")) == [
        "rng_rank0.safetensors", "rng_rank1.safetensors",
    ]  # fmt: skip
    resumed = _rewardkit([*common, "--out", str(o3)], 2, tmp_path, o3)
    assert len({w.split()[0] for w in resumed}) == 1, resumed
    summary = json.loads((o3 / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 4
    assert _max_diff(o2 / weights, o3 / weights) == 0.0
    assert len(writers) == 1, writes


TINY_EARLY_RFNET = dict(fusion="early", modalities=["product", "generated", "placed", "height"],
                        width=8, resolution=32, dropout=0.2)  # fmt: skip


def _early_one_and_two(tmp: Path, common: list[str], model: dict, train: dict):
    """``common`` (an ``_rfnet_command``) with the architecture ``model`` and the training
    config ``train``, run in one process and in two: (weights of one, weights of two, the
    two-process run's folder)."""
    cfg, train_cfg = tmp / "early.yaml", tmp / "early-train.yaml"
    cfg.write_text(yaml.safe_dump(model))
    train_cfg.write_text(yaml.safe_dump(train))
    common = list(common)
    common[common.index("--model-config") + 1] = str(cfg)
    common[common.index("--config") + 1] = str(train_cfg)
    o1, o2 = tmp / "e1", tmp / "e2"
    _rewardkit([*common, "--out", str(o1)], 1, tmp, o1)
    _rewardkit([*common, "--out", str(o2)], 2, tmp, o2)
    return load_file(o1 / RFNET_WEIGHTS), load_file(o2 / RFNET_WEIGHTS), o2


@pytest.mark.slow
def test_early_fusion_rfnet_two_processes_match_one(tmp_path):
    """The early-fusion preset's CNN (BatchNorm in every block) under the schedule it ships
    with (one-cycle, mirrored rows, label smoothing, weight decay): two processes end with one
    process's weights. BatchNorm is whole-batch (GlobalBatchNorm) and the mirror is drawn per
    (step, row); the head's dropout is off in training unless a config asks for it."""
    train = {"degraded_copy": False, "degrade": 0.0, "flip": True, "schedule": "onecycle",
             "label_smoothing": 0.05, "weight_decay": 0.05, "class_weighting": False}  # fmt: skip
    wa, wb, o2 = _early_one_and_two(tmp_path, _rfnet_command(tmp_path), TINY_EARLY_RFNET, train)
    assert any(".running_mean" in k for k in wa)  # the BatchNorm statistics are compared too
    gap = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert gap <= 2e-4, gap  # all-reduced statistics in another float order (see above)
    # The runs trained (equality is not that of two untouched inits): four steps, and the
    # BatchNorm statistics (zero at init) moved.
    assert json.loads((o2 / "train_summary.json").read_text())["steps"] == 4
    assert max(float(v.abs().max()) for k, v in wa.items() if ".running_mean" in k) > 1e-3


@pytest.mark.slow
def test_measurement_heads_two_processes_match_one(tmp_path):
    """Measurement heads (``measurement_weight``) beside the class-weighted cross-entropy, on
    the oracle's labels and measurements: a target the oracle could not take (no prop, NaN)
    counts for nothing, and each process's share of the step still adds up to one process's
    loss, so two processes end with one process's weights."""
    from rewardkit.world.export import label_manifest

    common = _rfnet_command(tmp_path)
    labelled = tmp_path / "T.parquet"
    label_manifest(common[common.index("--manifest") + 1], progress=False,
                   training_out=labelled)  # fmt: skip
    common[common.index("--manifest") + 1] = str(labelled)
    train = {"degraded_copy": False, "degrade": 0.0, "flip": True, "measurement_weight": 1.0}
    wa, wb, _ = _early_one_and_two(tmp_path, common, {**TINY_EARLY_RFNET, "dropout": 0.0}, train)
    assert any(k.startswith("measure.") for k in wa)
    gap = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert gap <= 2e-4, gap  # all-reduced BatchNorm statistics in another float order


FINETUNE_WEIGHTS = "model/controlnet/diffusion_pytorch_model.safetensors"


def _finetune_command(tmp: Path) -> list[str]:
    """``finetune`` of a tiny generator (3 DDIM steps) on 8 products of a 10-product world
    (2 held out as the probe set): 2 steps of 4, a checkpoint after each."""
    from rewardkit.generation.default import build_generator
    from rewardkit.world.export import render_world
    from tests.generation.conftest import TINY

    base = tmp / "base"
    build_generator(TINY, seed=0).save_pretrained(base)
    (base / "rewardkit_generator.json").write_text(
        json.dumps({"sampler": {"steps": 3, "guidance_scale": 2.0}})
    )
    render_world(tmp / "w", n=10, seed=1, size=32, progress=False)
    return ["finetune", "--generator", str(base), "--products", str(tmp / "w"),
            "--max-steps", "2", "--batch-size", "4", "--probe-size", "2",
            "--probe-every", "0", "--grad-window", "2", "--lr", "1e-3",
            "--checkpoint-every", "1", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_finetune_two_processes_match_one(tmp_path):
    """RFFT with the embedded RFNet reward on a tiny generator: each process generates its
    own products (seeds per product and step), t is drawn per step. Then a two-process run
    killed after step 1 and run again ends where the uninterrupted one did."""
    common = _finetune_command(tmp_path)
    base = tmp_path / "base"
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    _rewardkit([*common, "--out", str(o1)], 1, tmp_path, o1)
    _rewardkit([*common, "--out", str(o2)], 2, tmp_path, o2)
    weights = FINETUNE_WEIGHTS
    # Tolerance: AdamW normalises each element's step (the first is lr * sign(g)), so an
    # element whose gradient is float noise (|g| below ~1e-6, where a sum in another order
    # flips its sign) moves by up to 2 lr = 2e-3 either way, and step 2 carries that on:
    # the weights cannot agree to 1e-5 everywhere (measured: 0.4% of elements differ by more,
    # at most 1.5e-3). What must hold: every step's logged losses agree (same products,
    # seeds and t in both runs: a wrong split changes them at once), and all but a small
    # share of elements agree to 1e-5. The exact check of the gradient a step averages over
    # processes is test_rfft_gradient_of_the_batch_is_the_mean_over_its_parts.
    a, b = load_file(o1 / weights), load_file(o2 / weights)
    differing = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert differing / sum(v.numel() for v in a.values()) < 0.02
    assert _max_diff(o1 / weights, base / "controlnet" / weights.split("/", 2)[2]) > 1e-4
    c1, c2 = (_curve(o / "curves.csv", "reward_loss") for o in (o1, o2))
    assert len(c1) == 2 and c1 == pytest.approx(c2, rel=1e-5)
    s1 = json.loads((o1 / "finetune_summary.json").read_text())
    s2 = json.loads((o2 / "finetune_summary.json").read_text())
    # Probes run in the main process only (the same figures; their wall time aside).
    untimed = [
        {k: v for k, v in s["probe_before"].items() if k != "probe_seconds"} for s in (s1, s2)
    ]
    assert untimed[0] == untimed[1]
    # Killed right after the step-1 checkpoint, the same command again: the step-1 losses come
    # from the checkpoint's history, step 2 is drawn as before, the weights are o2's exactly.
    o3 = tmp_path / "o3"
    _rewardkit([*common, "--out", str(o3)], 2, tmp_path, o3, kill_at=1)
    assert len(list((o3 / "checkpoint").glob("rng_rank*"))) == 2
    resumed = _rewardkit([*common, "--out", str(o3)], 2, tmp_path, o3)
    assert len({w.split()[0] for w in resumed}) == 1, resumed
    assert json.loads((o3 / "finetune_summary.json").read_text())["resumed_from"] == 1
    assert _max_diff(o2 / weights, o3 / weights) == 0.0
    assert _curve(o3 / "curves.csv", "reward_loss") == c2


@pytest.mark.slow
def test_finetune_with_kl_beside_cc_two_processes_match_one(tmp_path):
    """``--kl-beta`` adds the KL term beside CC inside each process's share of the step: two
    processes end with one process's weights and the same losses per step."""
    common = [*_finetune_command(tmp_path), "--kl-beta", "1"]
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    _rewardkit([*common, "--out", str(o1)], 1, tmp_path, o1)
    _rewardkit([*common, "--out", str(o2)], 2, tmp_path, o2)
    a, b = load_file(o1 / FINETUNE_WEIGHTS), load_file(o2 / FINETUNE_WEIGHTS)
    differing = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert differing / sum(v.numel() for v in a.values()) < 0.02  # as the test above
    for o in (o1, o2):
        assert json.loads((o / "finetune_summary.json").read_text())["config"]["kl_beta"] == 1.0
    c1, c2 = (_curve(o / "curves.csv", "reward_loss") for o in (o1, o2))
    assert len(c1) == 2 and c1 == pytest.approx(c2, rel=1e-5)


def _curve(path: Path, column: str) -> list[float]:
    import csv

    with open(path) as f:
        return [float(r[column]) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.parametrize("kl_beta", [0.0, 1.0])
def test_rfft_gradient_of_the_batch_is_the_mean_over_its_parts(kl_beta):
    """What two processes average (each half of the batch, its own mean loss) is the
    gradient of the whole batch's mean loss: RFFT's loss has no term across products, with
    the KL term beside CC (``--kl-beta``) as without it."""
    import copy

    from rewardkit.generation.default import build_generator
    from rewardkit.generation.pipeline import AdGenerator, SamplerConfig, prepare_batch
    from rewardkit.generation.product import prepare_product
    from rewardkit.generation.recurrent import ProductJob
    from rewardkit.training.rfft import RFFTTrainee, load_objective, rfft_loss
    from tests.generation.conftest import TINY, product_photo

    tiny_generator = build_generator(TINY, seed=0)
    objective = load_objective("rfnet", None)
    photos = [product_photo(s) for s in range(4)]
    size = tiny_generator.resolution
    jobs = [ProductJob(f"p{i}", photos[i], prepare_product(photos[i], size), "a mug on a table",
                       "mug, 10 cm", 10.0, 0.4) for i in range(4)]  # fmt: skip

    def gradient(parts: list[list[int]]) -> torch.Tensor:
        g = tiny_generator
        gen = AdGenerator(copy.deepcopy(g.unet), copy.deepcopy(g.controlnet), g.vae,
                          g.text_encoder, g.tokenizer, g.scheduler)  # fmt: skip
        trainee = RFFTTrainee(gen, "controlnet")
        # Moved off its frozen reference (the same draws in each call), so that the KL term
        # and its gradient are not zero as they are at step 0.
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in gen.controlnet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=noise))
        for idx in parts:
            part = [jobs[i] for i in idx]
            batch = prepare_batch(gen, [j.prepared for j in part], [j.prompt for j in part],
                                  [10 + i for i in idx])  # fmt: skip
            loss, logs = rfft_loss(
                gen,
                trainee,
                batch,
                part,
                objective,
                SamplerConfig(steps=4, guidance_scale=2.0),
                3,
                "cc",
                1.0,
                kl_beta=kl_beta,
            )
            (loss / len(parts)).backward()
            assert (logs.get("regularizer_kl", 0.0) > 0) == (kl_beta > 0)
        return torch.cat([p.grad.flatten() for p in gen.controlnet.parameters()])

    whole, halves = gradient([[0, 1, 2, 3]]), gradient([[0, 1], [2, 3]])
    assert whole.abs().max() > 1e-3  # the reward reaches the ControlNet
    assert (whole - halves).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------
# One process (the default run).


def _resumes_exactly(monkeypatch, tmp: Path, command: list[str], kill_at: int, weights: str,
                     resumed: list[str] = ()) -> tuple[Path, Path]:  # fmt: skip
    """``rewardkit command`` in this process: once straight through, once stopped right after
    its step-``kill_at`` checkpoint and run again (with ``resumed`` added): the same weights,
    bit for bit. Returns the two run folders."""
    from rewardkit.cli import main

    straight, killed = tmp / "straight", tmp / "killed"
    assert main([*command, "--out", str(straight)]) == 0
    with _killed_at(monkeypatch, killed, kill_at):
        main([*command, "--out", str(killed)])
    assert main([*command, *resumed, "--out", str(killed)]) == 0
    assert _max_diff(straight / weights, killed / weights) == 0.0
    return straight, killed


def test_rfnet_killed_and_run_again_ends_with_the_same_weights(monkeypatch, tmp_path):
    """One process, killed after step 2 of 4, resumed with a loader process reading ahead
    (any number resumes): the lr drop at step 2 and the keyed degradation draws continue
    as in the run that was never stopped."""
    _, killed = _resumes_exactly(
        monkeypatch, tmp_path, _rfnet_command(tmp_path), 2, RFNET_WEIGHTS,
        resumed=["--loader-workers", "1"],
    )  # fmt: skip
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 4


def test_finetune_killed_and_run_again_ends_with_the_same_weights(monkeypatch, tmp_path):
    """One process, killed after step 1 of 2: the base model's probe is not run again, step
    2's products, seeds and t are those of the run that was never stopped."""
    straight, killed = _resumes_exactly(
        monkeypatch, tmp_path, _finetune_command(tmp_path), 1, FINETUNE_WEIGHTS
    )
    assert json.loads((killed / "finetune_summary.json").read_text())["resumed_from"] == 1
    assert _curve(killed / "curves.csv", "reward_loss") == _curve(
        straight / "curves.csv", "reward_loss"
    )


def test_grad_accum_gives_the_weights_of_one_step_over_the_whole_batch(tiny, tmp_path):
    model, pairs = tiny
    base = dict(preset="all", lr=3e-3, batch_size=16, epochs=1, max_steps=3)
    out = {}
    for n in (1, 2, 4):
        cfg = RewardTrainConfig(**base, grad_accum=n)
        train_reward(model, pairs, tmp_path / f"a{n}", cfg, progress=False)
        out[n] = tmp_path / f"a{n}" / "model" / "model.safetensors"
    assert _max_diff(out[1], out[2]) <= 1e-5 and _max_diff(out[1], out[4]) <= 1e-5
    assert _max_diff(out[1], model / "model.safetensors") > 1e-3


def test_batch_not_divisible_by_grad_accum_is_refused(tiny, tmp_path):
    model, pairs = tiny
    cfg = RewardTrainConfig(batch_size=16, epochs=1, grad_accum=3)
    with pytest.raises(ValueError, match=r"--batch-size 16 .* 1 process\(es\) x --grad-accum 3"):
        train_reward(model, pairs, tmp_path / "run", cfg, progress=False)
    with pytest.raises(ValueError, match="grad_accum"):
        RewardTrainConfig(grad_accum=0)


def test_two_runs_with_other_precisions_in_one_process(tiny, tmp_path):
    model, pairs = tiny
    for precision in ("no", "bf16", "no"):
        cfg = RewardTrainConfig(batch_size=16, epochs=1, max_steps=1, mixed_precision=precision)
        result = train_reward(model, pairs, tmp_path / precision, cfg, progress=False)
        assert result.steps == 1


class _Line(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_validation_runs_once_per_epoch_and_the_global_rng_is_left_alone(tmp_path):
    model, x = _Line(), torch.linspace(-1, 1, 8)
    calls = []

    def evaluate() -> dict[str, float]:
        calls.append(1)
        return {"val": float(model.w.detach())}

    def step_loss(rows: torch.Tensor) -> torch.Tensor:
        return ((model.w - x[rows]) ** 2).mean()

    torch.manual_seed(123)
    before = torch.get_rng_state()
    config = TrainConfigBase(lr=0.1, batch_size=4, epochs=2)
    result = run_training(model, 8, step_loss, config, tmp_path, {"k": 1}, evaluate,
                          lambda p: None, False)  # fmt: skip
    assert len(calls) == 2 and result.metrics == {"val": result.history[-1]["val"]}
    assert torch.equal(torch.get_rng_state(), before)  # not reseeded by the library
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "rng_rank0.safetensors").is_file()
    assert not list(ckpt.glob("*.pkl"))


def test_replace_dir_under_concurrent_writers_leaves_one_folder(tmp_path):
    dst, errors = tmp_path / "model", []

    def writer(k: int) -> None:
        try:
            for i in range(20):
                text = f"{k} {i}"
                write_folder_atomic(dst, lambda t, text=text: (t / "who").write_text(text))
        except Exception as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (dst / "who").read_text().endswith("19")


def test_dropout_is_switched_off_for_training_and_restored():
    """Dropout masks come from each process's RNG: the loop switches every dropout off (nn
    modules and attention layers' float rates) unless a config keeps it, and gives the
    model its rates back afterwards."""
    from rewardkit.models.rfnet import RFNet
    from rewardkit.training.distributed import disable_dropout, restore_dropout
    from tests.models.test_rfnet import inputs, tiny_config

    torch.manual_seed(0)
    model = RFNet(tiny_config(dropout=0.3, modalities=("product", "generated"))).train()
    x = {k: v for k, v in inputs().items() if k in ("product", "generated")}
    assert not torch.equal(model(**x), model(**x))  # dropout on
    changed = disable_dropout(model)
    assert changed and torch.equal(model(**x), model(**x))
    attention = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attention and all(m.dropout == 0.0 for m in attention)
    restore_dropout(changed)
    assert all(m.dropout == 0.3 for m in attention)
    assert not torch.equal(model(**x), model(**x))


def test_the_default_dual_encoder_trains_without_dropout(tmp_path, monkeypatch):
    """The embedded default's text tower (MiniLM) has dropout 0.1: in the loop its forward
    in train mode is deterministic."""
    import rewardkit.training.loop as loop
    from rewardkit.models.social_reward import SocialReward, build_default_dual_encoder

    reward = SocialReward.from_pretrained(build_default_dual_encoder(tmp_path / "m", 32))
    seen = []

    def spy(accelerator, model, *a):
        model.train()
        with torch.no_grad():
            e = [model.embed_texts(["a red mug on a table"]) for _ in range(2)]
        seen.append(torch.equal(*e))
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(loop, "_train", spy)
    config = TrainConfigBase(lr=1e-3, batch_size=2, epochs=1)
    with pytest.raises(KeyboardInterrupt):
        run_training(reward, 4, lambda rows: None, config, tmp_path / "o", {}, None,
                     lambda p: None, False)  # fmt: skip
    assert seen == [True]
    reward.train()
    with torch.no_grad():  # restored afterwards: dropout is back
        e = [reward.embed_texts(["a red mug on a table"]) for _ in range(2)]
    assert not torch.equal(*e)
