#!/usr/bin/env bash
# Seed 002's study on the embedded model (GSM8K, plain-text prompts as recipes/qwen_math_sft/ has them):
#  1. dataset-size ablation: SFT on the first 32, 64 and 128 gold solutions of train.jsonl (one sweep);
#  2. traces, then filter: the base model samples 4 solutions for each of the first 64 training questions,
#     `ftlab filter` keeps those the GSM8K checker scores correct, and SFT on the kept traces is compared with
#     SFT on all of them.
# Every run's accuracy is measured at its last step on test rows 0-99 (data.val, nothing was chosen on them),
# and the base model is scored on the same rows with the same prompt.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/studies/seed002}
RECIPE=recipes/qwen_math_sft/cpu_tiny.yaml
SCORE="data.val_limit=100 train.eval_every=1000 eval.max_new_tokens=160"
ftlab eval $RECIPE output_dir=$OUT eval.offset=0 eval.limit=100 eval.max_new_tokens=160
ftlab sweep $RECIPE --grid "data.limit=[32,64,128]" output_dir=$OUT sweep.dir=$OUT/sizes $SCORE
ftlab sample $RECIPE --out $OUT/traces.jsonl --samples 4 data.limit=64 eval.temperature=1.0 \
    eval.max_new_tokens=160
ftlab filter $RECIPE --input $OUT/traces.jsonl --out $OUT/kept.jsonl
ftlab sweep $RECIPE --grid "data.filter_correct=[true,false]" output_dir=$OUT sweep.dir=$OUT/traces \
    data.train=$OUT/traces.jsonl data.limit=null $SCORE
ftlab report $OUT/sizes $OUT/traces $OUT/eval --out $OUT/report
