"""Experiment: a learned prop-height judge as an extra RFFT reward (MODELS.md, "A prop-size
reward"). The shipped RFNet judges a prop's size poorly on generated images; this judge is
trained on one thing only, log2(prop height / product height) in pixels, from the oracle's
measurements of renders, and its squared distance to the ratio the prompt's prop and the
caption's height imply is added to RFNet's F_AC during ``rewardkit finetune``.

    python recipes/prop_size_reward.py label MANIFEST... --out LABELS.parquet
    python recipes/prop_size_reward.py train --data LABELS.parquet... --test LABELS.parquet \
        --out DIR [--epochs N --lr LR]
    INIT=DIR/size_judge.pt python recipes/prop_size_reward.py train ...  # continue, cosine lr
    python recipes/prop_size_reward.py test --out DIR --test LABELS.parquet
    [RFNET_W=1] python recipes/prop_size_reward.py finetune JUDGE_DIR WEIGHT -- \
        <rewardkit finetune args>

``label`` keeps the images whose prompt names a prop; the target is NaN where the oracle
finds no prop of that kind. Not part of the library: it did not lower Size Mismatch.
"""

import argparse
import math
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewardkit.io import read_image_rgb, write_parquet_atomic
from rewardkit.world.export import judge_row, load_product_photo
from rewardkit.world.placement import place_product
from rewardkit.world.scene import PROPS

KINDS = list(PROPS)
PROP_RE = re.compile(r"next to an? (" + "|".join(KINDS) + r")")


def prompt_kind(prompt: str) -> str | None:
    m = PROP_RE.search(prompt)
    return m.group(1) if m else None


def _one(args):
    row, i, manifest, kind = args
    verdict, m = judge_row(row, i, manifest)
    s, measured = m["scale_error"], m["prop_kind"]
    r = float("nan")
    if measured == kind and math.isfinite(s):
        r = s + math.log2(PROPS[kind][0] / row["product_height_cm"])  # log2(prop / product px)
    return verdict, s, measured, r


def cmd_label(manifests, out):
    rows, jobs = [], []
    for man in manifests:
        man = Path(man).resolve()
        for i, r in enumerate(pq.read_table(man).to_pylist()):
            kind = prompt_kind(r["prompt"])
            if kind is None:
                continue
            jobs.append((r, i, man, kind))
            rows.append(
                dict(
                    path=str(man.parent / r["path"]),
                    product_path=str(man.parent / r["product_path"]),
                    prompt=r["prompt"],
                    cm=float(r["product_height_cm"]),
                    fill=float(r["fill"]),
                    kind=kind,
                )
            )
    with ProcessPoolExecutor(2) as ex:
        res = list(ex.map(_one, jobs, chunksize=64))
    for r, (v, s, k, ratio) in zip(rows, res, strict=True):
        r.update(verdict=v, scale_error=s, oracle_kind=k, log_ratio=ratio)
    write_parquet_atomic(out, pa.Table.from_pylist(rows))
    ok = sum(math.isfinite(r["log_ratio"]) for r in rows)
    print(f"{out}: {len(rows)} prop prompts, {ok} measured")


class SizeJudge(nn.Module):
    """Image + product mask + prop kind -> log2(prop height / product height)."""

    def __init__(self, width=32):
        super().__init__()
        c = 3 + 1 + 1 + len(KINDS)
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.SiLU(),
            nn.Conv2d(16, 2 * w, 3, stride=2, padding=1), nn.SiLU(),  # 32
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),  # 16
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),  # 8
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * 64, 128), nn.SiLU(), nn.Linear(128, 1)
        )

    def forward(self, img, mask, kind_idx):
        b, _, h, w = img.shape
        yy = torch.linspace(-1, 1, h, device=img.device).view(1, 1, h, 1).expand(b, 1, h, w)
        k = F.one_hot(kind_idx, len(KINDS)).float()[:, :, None, None].expand(b, len(KINDS), h, w)
        x = torch.cat([img * 2 - 1, mask, yy, k], 1)
        return self.head(self.net(x)).squeeze(1)


def load_set(files):
    imgs, masks, kinds, ys = [], [], [], []
    for f in files:
        for r in pq.read_table(f).to_pylist():
            if not math.isfinite(r["log_ratio"]):
                continue
            img = read_image_rgb(r["path"])
            layer, _ = place_product(load_product_photo(r["product_path"]), len(img), r["fill"])
            imgs.append(img)
            masks.append(layer[..., 3] > 127)
            kinds.append(KINDS.index(r["kind"]))
            ys.append(r["log_ratio"])
    img = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    mask = torch.from_numpy(np.stack(masks)).float()[:, None]
    return img, mask, torch.tensor(kinds), torch.tensor(ys, dtype=torch.float32)


def augment(img, g):
    # Soften like the generator's VAE: random blur mix and noise.
    blur = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    a = torch.rand(img.shape[0], 1, 1, 1, generator=g) * 0.7
    out = (1 - a) * img + a * blur
    return (out + 0.02 * torch.randn(out.shape, generator=g)).clamp(0, 1)


def cmd_train(data, test, out, epochs, lr, seed):
    torch.manual_seed(seed)
    X = load_set(data)
    T = load_set([test]) if test else None
    print(f"train {len(X[3])}, test {0 if T is None else len(T[3])}; target sd {X[3].std():.3f}")
    model = SizeJudge()
    if os.environ.get("INIT"):
        model.load_state_dict(torch.load(os.environ["INIT"], weights_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(X[3])
    bs = min(64, n)
    steps = epochs * (n // bs)
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        if os.environ.get("INIT")
        else torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    )
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        model.train()
        tot = 0.0
        for i in range(0, n - bs + 1, bs):
            b = perm[i : i + bs]
            pred = model(augment(X[0][b], g), X[1][b], X[2][b])
            loss = F.smooth_l1_loss(pred, X[3][b], beta=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(b)
        msg = f"epoch {ep} loss {tot / n:.4f}"
        if T is not None:
            msg += " " + evaluate(model, T, test)
        print(msg, flush=True)
        os.makedirs(out, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(out, "size_judge.pt"))


def evaluate(model, T, test_file):
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [
                model(T[0][i : i + 256], T[1][i : i + 256], T[2][i : i + 256])
                for i in range(0, len(T[3]), 256)
            ]
        )
    err = pred - T[3]
    # Size verdicts: |scale_error| > 0.45, with expected from the kind and cm.
    rows = [r for r in pq.read_table(test_file).to_pylist() if math.isfinite(r["log_ratio"])]
    exp = torch.tensor([math.log2(PROPS[r["kind"]][0] / r["cm"]) for r in rows])
    s_true, s_pred = T[3] - exp, pred - exp
    agree = ((s_true.abs() > 0.45) == (s_pred.abs() > 0.45)).float().mean()
    corr = np.corrcoef(pred.numpy(), T[3].numpy())[0, 1]
    mismatch = float((s_true.abs() > 0.45).float().mean())
    return (
        f"test err sd {err.std():.3f} mae {err.abs().mean():.3f} corr {corr:.3f} "
        f"size-verdict agree {agree:.3f} (true mismatch {mismatch:.2f})"
    )


def finetune(judge_dir: str, weight: float, argv: list[str]) -> None:
    """``rewardkit finetune`` with the RFNet objective plus ``weight`` x the size loss."""
    import rewardkit.commands.finetune as finetune_cmd
    import rewardkit.training.rfft as rfft
    from rewardkit.cli import main

    rfnet_w = float(os.environ.get("RFNET_W", "1"))
    judge = SizeJudge()
    judge.load_state_dict(torch.load(os.path.join(judge_dir, "size_judge.pt"), weights_only=True))
    judge.eval().requires_grad_(False)

    class RFNetPlusSize(rfft.RFNetObjective):
        def __call__(self, images, jobs, rng=None):
            loss, p = super().__call__(images, jobs, rng)
            loss = loss * rfnet_w
            idx = [i for i, j in enumerate(jobs) if prompt_kind(j.prompt)]
            if idx:
                kinds = [prompt_kind(jobs[i].prompt) for i in idx]
                target = torch.tensor(
                    [
                        math.log2(PROPS[k][0] / jobs[i].height_cm)
                        for i, k in zip(idx, kinds, strict=True)
                    ]
                )
                keep = [torch.from_numpy(jobs[i].prepared.keep) for i in idx]
                mask = torch.stack(keep)[:, None].float()
                img = images[idx]
                if img.shape[-1] != 64:
                    img = F.interpolate(img, size=(64, 64), mode="bilinear")
                pred = judge(img, mask, torch.tensor([KINDS.index(k) for k in kinds]))
                extra = torch.zeros_like(loss)
                extra[idx] = (pred - target).pow(2)
                loss = loss + weight * extra
            return loss, p

    load = finetune_cmd.load_objective

    def load_objective(kind, folder, views=1):
        obj = load(kind, folder, views)
        obj.__class__ = RFNetPlusSize
        return obj

    finetune_cmd.load_objective = load_objective
    sys.exit(main(argv))


if __name__ == "__main__":
    if sys.argv[1:2] == ["finetune"]:
        finetune(sys.argv[2], float(sys.argv[3]), sys.argv[sys.argv.index("--") + 1 :])
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("manifests", nargs="*")
    ap.add_argument("--out")
    ap.add_argument("--data", nargs="*")
    ap.add_argument("--test")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.cmd == "test":
        m = SizeJudge()
        m.load_state_dict(torch.load(os.path.join(a.out, "size_judge.pt"), weights_only=True))
        print(evaluate(m, load_set([a.test]), a.test))
    elif a.cmd == "label":
        cmd_label(a.manifests, a.out)
    else:
        cmd_train(a.data, a.test, a.out, a.epochs, a.lr, a.seed)
    sys.exit(0)
