"""Assemble trained RFNets of one architecture into one RFNet folder that averages their
class probabilities (``RFNetConfig.ensemble``): ``inspect``, ``eval rfnet``, Recurrent
Generation, ``serve`` and the RFFT reward read it as one model.

    python recipes/rfnet_ensemble.py --member A B C --out ENSEMBLE --accept-threshold 0.613

``--accept-threshold`` is the ensemble's operating point (chosen on validation, e.g. by
``recipes/inspector_readouts.py``, whose ``ensemble`` readout averages at the shipped model's
threshold); without it the first member's is used. ``loop_threshold`` is left unset: choose
it for the ensemble with ``recipes/choose_loop_threshold.py --write``. The ensemble's
training keys are the union of its members' (what any member saw, the ensemble saw); a member
that records none makes the ensemble's unknown as well, and the command says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rewardkit.data.keys import KEYS_FILE, TrainingKeys, read_training_keys, write_training_keys
from rewardkit.models.inspector import INSPECTOR_FILE
from rewardkit.models.rfnet import RFNet


def assemble(members: list[Path], out: Path, accept_threshold: float | None) -> dict:
    for folder in members:
        if (folder / INSPECTOR_FILE).is_file():
            raise SystemExit(
                f"{folder}: has {INSPECTOR_FILE} (extractor pointers); ensembles of models "
                "with their own extractors are not supported"
            )
    models = [RFNet.from_pretrained(folder) for folder in members]
    if accept_threshold is None:
        accept_threshold = models[0].config.accept_threshold
    try:
        ensemble = RFNet.ensemble_of(models, accept_threshold=accept_threshold)
    except ValueError as err:
        raise SystemExit(f"--member: {err}") from None
    ensemble.save_pretrained(out)
    keys, unknown = TrainingKeys(), []
    for folder in members:
        if (folder / KEYS_FILE).is_file():
            keys.update(read_training_keys(folder))
        else:
            unknown.append(str(folder))
    if unknown:
        print(f"no {KEYS_FILE} in {unknown}: the ensemble records no training keys")
    else:
        write_training_keys(out, keys)
    return {
        "out": str(out),
        "members": [str(m) for m in members],
        "accept_threshold": accept_threshold,
        "training_keys": None if unknown else len(keys.products),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--member", nargs="+", type=Path, required=True, help="RFNet folders")
    parser.add_argument("--out", type=Path, required=True, help="the ensemble's folder")
    parser.add_argument(
        "--accept-threshold", type=float, default=None,
        help="the ensemble's operating point (default: the first member's)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for folder in args.member:
        if not folder.is_dir():
            parser.error(f"--member: {folder} is not a folder")
    print(json.dumps(assemble(args.member, args.out, args.accept_threshold)))


if __name__ == "__main__":
    main()
