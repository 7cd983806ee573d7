#!/usr/bin/env bash
# The labelled generated-image sets of issue 23 (MODELS.md), drawn again from their seeds:
# AdWorld products (`world render`), painted once each (`generate`), labelled by the oracle
# (`world label --training-manifest`). One set takes about 0.85 s per image on 2 cores.
#
#   bash recipes/inspector_generated_data.sh OUT [NAME ...]      # default: every set
#   DRY_RUN=1 bash recipes/inspector_generated_data.sh OUT TEST  # print the commands only
#
# Writes OUT/P_NAME (products), OUT/G_NAME (images), OUT/T_NAME.parquet (the labelled
# manifest `train rfnet` / `eval rfnet` read). A set whose T_NAME.parquet exists is skipped,
# so an interrupted run resumes at the set it was painting.
set -euo pipefail
out=${1:?usage: inspector_generated_data.sh OUT [NAME ...]}
shift
models=$(cd "$(dirname "$0")/.." && pwd)/src/rewardkit/assets/models
balance="Available=0.97,Unsuitable=0.03"
# NAME  world seed  products  generate seed  generator  images (--limit)  role in MODELS.md
sets="
TRAIN 23001 3000 12 generator      3000  rfnet training
VAL   23002  400 11 generator       400  rfnet training (earlier: route validation)
LOOP  23003 2000 13 generator-rfft 1600  rfnet training (the data loop)
MORE  23005 2000 15 generator      2000  rfnet training (the 7,000-image model)
TEST  23777  400 14 generator       400  test products: no choice is made on them
MVAL  23301  400 41 generator       400  validation (mirror readout, readouts)
RVAL  23302  400 42 generator       400  validation (readouts)
FT    23303 2000 43 generator      2000  readout candidates' fine-tuning (not adopted)
FRESH  23888 400 16 generator      400  test (first fresh world, 2026-12-05)
FRESH2 23889 400 17 generator      400  test (second fresh world, read after FRESH)
HT1   23901  400 51 generator       400  test: drawn after the ensemble was shipped, read once
HT2   23902  400 52 generator       400  test: as HT1
HT3   23903  400 53 generator       400  test: as HT1
"
known=$(awk 'NF {print $1}' <<< "$sets" | tr '\n' ' ')
for name in "$@"; do
    if [[ " $known" != *" $name "* ]]; then
        echo "inspector_generated_data.sh: unknown set $name (known: $known)" >&2
        exit 2
    fi
done
wanted=" $* "
run() { if [ -n "${DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi; }
mkdir -p "$out"
while read -r name world n seed generator limit _; do
    [ -z "$name" ] && continue
    if [ $# -gt 0 ] && [[ "$wanted" != *" $name "* ]]; then continue; fi
    [ -f "$out/T_$name.parquet" ] && { echo "$name: $out/T_$name.parquet exists, skipped"; continue; }
    run rewardkit world render --out "$out/P_$name" --n "$n" --seed "$world" --size 64 --balance "$balance"
    run rewardkit generate --products "$out/P_$name/manifest.parquet" --out "$out/G_$name" \
        --seed "$seed" --batch-size 32 --limit "$limit" --generator "$models/$generator" --no-progress
    run rewardkit world label --manifest "$out/G_$name/manifest.parquet" --out "$out/L_$name.parquet" \
        --training-manifest "$out/T_$name.parquet"
done <<< "$sets"
