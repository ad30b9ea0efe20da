"""Command-line verbs of from-scratch pretraining (seed 003), added to `ftlab` by `add_verbs`.

    ftlab prepare-corpus INPUT --out DIR [--full | --max-examples-per-split N] [--s3-bucket B ...]
    ftlab replay RUN --step N                   # rebuild step N's batch from (seed, step), rerun it with anomaly detection
    ftlab in-context-loss RECIPE [key=value]    # mean loss by position over validation windows -> CSV, plot, ICL score
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_prepare_corpus(args: argparse.Namespace) -> int:
    from ftlab.data.corpus import PrepareSettings, prepare_corpus, summary_line

    s = PrepareSettings(input=args.input, out=args.out, tokenizer=args.tokenizer, text_field=args.text_field,
                        category_field=args.category_field, id_field=args.id_field, seed=args.seed,
                        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        max_examples_per_split=None if args.full else args.max_examples_per_split,
                        workers=args.workers, hf_config=args.hf_config, hf_split=args.hf_split,
                        s3_bucket=args.s3_bucket, s3_prefix=args.s3_prefix, s3_endpoint=args.s3_endpoint,
                        overwrite=args.overwrite)
    meta = prepare_corpus(s)
    print(f"{args.out}: {summary_line(meta)}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from ftlab.train.forensics import replay

    report = replay(args.run, args.step, overrides=args.overrides)
    for w in report["windows"]:  # the whole text is in replay.json
        w["text"] = w["text"][:160] + ("..." if len(w["text"]) > 160 else "")
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_in_context_loss(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe
    from ftlab.incontext import run_in_context_loss

    model = [f"model.name={args.model}", "model.preset=null", "model.scratch=null"] if args.model else []
    cfg = load_recipe(args.recipe, model + list(args.overrides))
    summary = run_in_context_loss(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def add_verbs(sub: Any) -> None:
    pc = sub.add_parser("prepare-corpus", help="tokenize a JSONL (or datasets id) of text + category into a "
                        "memmap corpus for pretraining",
                        description="JSONL rows (or a datasets id) with a text and a category field -> DIR/"
                                    "tokens.bin, index.jsonl, splits.json, meta.json; built in a temp dir and "
                                    "renamed, so an interrupted run leaves nothing that looks complete")
    pc.add_argument("input", help="JSONL file, or a Hugging Face datasets id (needs the network)")
    pc.add_argument("--out", required=True, help="corpus directory to create")
    pc.add_argument("--tokenizer", default="smollm2-135m-instruct",
                    help="tokenizer: embedded model name, local dir or hub id (default: the embedded model's)")
    pc.add_argument("--text-field", default="text")
    pc.add_argument("--category-field", default="category")
    pc.add_argument("--id-field", default="id", help="document id field (default: id; the line number if absent)")
    pc.add_argument("--seed", type=int, default=0, help="split seed (documents hashed with it)")
    pc.add_argument("--val-fraction", type=float, default=0.05)
    pc.add_argument("--test-fraction", type=float, default=0.05)
    size = pc.add_mutually_exclusive_group()
    size.add_argument("--max-examples-per-split", type=int, default=50, metavar="N",
                      help="at most N documents per split, for development (default: 50)")
    size.add_argument("--full", action="store_true", help="every document (no per-split limit)")
    pc.add_argument("--workers", type=int, default=2, help="tokenizer processes (0: in this process)")
    pc.add_argument("--hf-config", default=None, help="datasets config name (datasets ids only)")
    pc.add_argument("--hf-split", default="train", help="datasets split to read (datasets ids only)")
    pc.add_argument("--s3-bucket", default=None, help="download the corpus from here if present, else upload it")
    pc.add_argument("--s3-prefix", default="", help="key prefix under the bucket")
    pc.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS)")
    pc.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    pc.set_defaults(fn=cmd_prepare_corpus)

    rp = sub.add_parser("replay", help="rebuild a pretraining step's batch from (seed, step) and rerun it from the "
                        "last checkpoint with anomaly detection",
                        description="rebuild step N's windows from the run's seed, show them as text, and rerun "
                                    "the step from the newest checkpoint before it (or from initialisation) with "
                                    "autograd anomaly detection and forward hooks that name the first module whose "
                                    "output is not finite; writes RUN/replay/...")
    rp.add_argument("run", help="pretraining run directory")
    rp.add_argument("--step", type=int, required=True, help="1-based optimizer step, as logged")
    rp.add_argument("overrides", nargs="*", help="dotted overrides for the replay, e.g. train.precision=fp32")
    rp.set_defaults(fn=cmd_replay)

    ic = sub.add_parser("in-context-loss", help="mean loss by token position over validation windows of a corpus",
                        description="loss at every position of many validation windows of the recipe's corpus "
                                    "(pretrain.*), for any model (model.name: a run's final/, a hub id, the "
                                    "embedded model): CSV, plot and the in-context-learning score")
    ic.add_argument("recipe", help="recipe YAML file")
    ic.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.val_windows=1024")
    ic.add_argument("--model", default=None, help="the model to measure instead of the recipe's (a run's final/ or "
                    "best/, a local dir, a hub id, the embedded model): sets model.name and clears model.preset/scratch")
    ic.set_defaults(fn=cmd_in_context_loss)
