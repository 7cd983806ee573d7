"""Ship a generator fine-tuned by ``rewardkit finetune`` inside the package.

    python recipes/ship_finetuned_generator.py RUN_DIR NAME

Copies ``RUN_DIR/model`` (the changed components and ``rewardkit_generator.json``) to
``assets/models/NAME``, points its ``base`` at the shipped ``generator`` folder (the run must
have fine-tuned that one; checked), and copies the run's ``curves.png`` as
``rfft_curves.png`` and ``finetune_summary.json`` beside it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "rewardkit" / "assets" / "models"


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    run, name = Path(sys.argv[1]), sys.argv[2]
    model = run / "model"
    card = json.loads((model / "rewardkit_generator.json").read_text())
    base = (model / card["base"]).resolve()
    if base != (ASSETS / "generator").resolve():
        raise SystemExit(f"{run}: fine-tuned {base}, not the shipped generator")
    dst = ASSETS / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(model, dst)
    card["base"] = "../generator"
    (dst / "rewardkit_generator.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.copy(run / "curves.png", dst / "rfft_curves.png")
    shutil.copy(run / "finetune_summary.json", dst / "finetune_summary.json")
    print(f"shipped {model} -> {dst}")


if __name__ == "__main__":
    main()
