#!/usr/bin/env bash
# Seed 003's K-sweep on a laptop CPU and its report: tiny Llama-style models trained from scratch on the real
# arXiv abstracts, K in {1, 2, 4} archives x seeds {0, 1}, equal token budgets (recipes/arxiv/tiny.yaml), then
# validation loss and bits per byte against K, one line per seed and their mean.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/studies/seed003}
ftlab prepare-corpus ../shared/data/arxiv/abstracts_2007_first2000.jsonl --out $OUT/corpus \
    --full --val-fraction 0.1 --test-fraction 0.1
ftlab sweep recipes/arxiv/tiny.yaml output_dir=$OUT pretrain.corpus=$OUT/corpus sweep.dir=$OUT/ksweep
ftlab report $OUT/ksweep --out $OUT/report
