#!/usr/bin/env bash
# Seed 001's study on the embedded model: GSM8K main vs Socratic data x full SFT vs LoRA, base vs tuned,
# zero- and one-shot. Socratic training reads the first 128 rows of test_socratic.jsonl (train_socratic.jsonl
# is not in ../shared/data; with the hub, use data.train=hf:openai/gsm8k:socratic:train), so every evaluation
# skips test rows 0-255 and scores rows 256-355, which no run trained on and no setting was chosen on.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/studies/seed001}
EVAL="eval.offset=256 eval.limit=100 eval.max_new_tokens=160"
for v in toy_full toy_lora toy_full_socratic toy_lora_socratic; do
  ftlab train recipes/gemma_gsm8k/$v.yaml output_dir=$OUT data.limit=128 train.eval_every=16 $EVAL
done
for shots in 0 1; do
  ftlab eval recipes/gemma_gsm8k/toy_full.yaml output_dir=$OUT $EVAL eval.shots=$shots
  for v in full lora full-socratic lora-socratic; do
    ftlab eval recipes/gemma_gsm8k/toy_full.yaml output_dir=$OUT $EVAL eval.shots=$shots \
      model.name="$(ls -d $OUT/sft/*_gemma-gsm8k-toy-$v | tail -n1)/final"
  done
done
ftlab report $OUT/sft $OUT/eval --out $OUT/report
