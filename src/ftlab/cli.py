"""`ftlab <verb> ...`: the command line.

Every verb takes a recipe (YAML) and dotted overrides, e.g.
    ftlab train recipes/quickstart.yaml optim.lr=1e-5 train.max_steps=20
User errors print one line `ftlab: error: ...` and exit with code 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import NoReturn, Sequence

from ftlab.errors import Terminated, UserError

log = logging.getLogger("ftlab")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by test capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):  # noqa: ANN001 - set by StreamHandler.__init__; ignored
        pass


def setup_console_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("ftlab")
    if not any(getattr(h, "_ftlab_console", False) for h in logger.handlers):
        h = StderrHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        h._ftlab_console = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Libraries' progress chatter belongs in the bars, not as warnings on every load.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not sys.stderr.isatty():  # "Loading weights" bars on every model load are noise in a log or a pipe
        hf_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe
    from ftlab.train import run_training

    cfg = load_recipe(args.recipe, args.overrides)
    run_training(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe
    from ftlab.evaluate import run_compare, run_eval

    cfg = load_recipe(args.recipe, args.overrides)
    if args.compare:
        run_compare(cfg, args.compare)
    else:
        run_eval(cfg)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe
    from ftlab.infer import run_infer

    cfg = load_recipe(args.recipe, args.overrides)
    run_infer(cfg, args.input, args.output)
    return 0


def default_quickstart_recipe() -> str:
    """recipes/quickstart.yaml of the working directory, else of the source checkout ftlab runs from."""
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "recipes" / "quickstart.yaml").is_file():
            return str(root / "recipes" / "quickstart.yaml")
    raise UserError("no recipes/quickstart.yaml here or in the ftlab checkout; pass the recipe path: "
                    "ftlab quickstart path/to/quickstart.yaml")


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe
    from ftlab.quickstart import run_quickstart

    recipe = args.recipe or default_quickstart_recipe()
    cfg = load_recipe(recipe, args.overrides)
    run_quickstart(cfg)
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from ftlab.models.memory import cli_memory

    print(cli_memory(args))
    return 0


def cmd_loop(args: argparse.Namespace) -> int:
    from ftlab.config import load_recipe
    from ftlab.loops.oak import run_loop

    path = run_loop(load_recipe(args.recipe, args.overrides))
    print(path / "summary.json")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from ftlab.sokrates.verify_cmd import run_verify

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    _, summary = run_verify(args.task, args.file, traces=args.traces, limit=args.limit, output_dir=args.output_dir)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ftlab.use.chat import run_chat

    run_chat(args.model, adapter=args.adapter, overrides=args.overrides)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ftlab.use.server import run_server

    run_server(args.model, adapters=args.adapter or [], host=args.host, port=args.port, batch_size=args.batch_size)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ftlab.use.export import run_export

    run_export(args.source, out=args.out, merge=args.merge, gguf=args.gguf, push_to_hub=args.push_to_hub,
               dry_run=args.dry_run, private=args.private)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other user error: `ftlab: error: ...`, exit 2
    (plain argparse prints the whole usage block first). Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ftlab: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ftlab", description="LLM fine-tuning research toolkit: recipes for SFT "
                                "(full, LoRA, QLoRA), evaluation and inference, the same on CPU and GPU.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def with_recipe(name: str, help_: str, optional: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("recipe", nargs="?" if optional else None, help="recipe YAML file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
        return sp

    with_recipe("train", "train a model as a recipe says (SFT: full, LoRA, QLoRA)").set_defaults(fn=cmd_train)
    ev = with_recipe("eval", "evaluate model (+ adapter) on a task: predictions.jsonl + metrics.json")
    ev.add_argument("--compare", nargs=2, metavar=("BASE", "TUNED"),
                    help="evaluate two models/adapters on identical prompts and print one table")
    ev.set_defaults(fn=cmd_eval)
    inf = with_recipe("infer", "generate for a JSONL of prompts or messages (resumable)")
    inf.add_argument("--input", required=True, help="JSONL with 'prompt' or 'messages' per row")
    inf.add_argument("--output", required=True, help="JSONL to write (re-running resumes after its last row)")
    inf.set_defaults(fn=cmd_infer)
    with_recipe("quickstart", "data -> eval -> SFT -> eval -> report, on a laptop CPU",
                optional=True).set_defaults(fn=cmd_quickstart)
    with_recipe("loop", "SOKRATES OaK loop: SFT on option traces, then sample -> verify -> pairs -> DPO -> eval "
                        "per iteration (resumable)").set_defaults(fn=cmd_loop)
    mem = sub.add_parser("memory", help="estimate GPU memory for training a model",
                         description="estimate GPU memory: weights, gradients, optimizer states, activations")
    mem.add_argument("model", help="model name, hub id, local dir, or a config.json path")
    mem.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    mem.add_argument("--optim", choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"], default="adamw")
    mem.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    mem.add_argument("--batch-size", type=int, default=1)
    mem.add_argument("--seq-len", type=int, default=1024)
    mem.add_argument("--lora-r", type=int, default=16)
    mem.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                     help="LoRA target modules (default: q_proj k_proj v_proj o_proj)")
    mem.add_argument("--lora-dropout", type=float, default=0.0)
    mem.add_argument("--supervised-share", type=float, default=1.0, metavar="FRACTION",
                     help="share of tokens that carry loss; the LM head runs on those only (default 1.0: all)")
    mem.add_argument("--weight-dtype", choices=["fp32", "bf16", "fp16"], default=None,
                     help="dtype the weights are stored in (default: ftlab's model.dtype=fp32)")
    mem.add_argument("--gradient-checkpointing", action="store_true")
    mem.set_defaults(fn=cmd_memory)
    ver = sub.add_parser("verify", help="solve and check proofs of a PrOntoQA/FOLIO file (or model traces)",
                         description="solve every problem independently, optionize and verify its gold proof "
                                     "(or, with --traces, each record's 'response' trace) and print a JSON "
                                     "summary; details in runs/verify/")
    ver.add_argument("task", choices=["prontoqa", "folio"])
    ver.add_argument("file", help="JSONL/JSON in the authors' layout (PrOntoQA: question, query, "
                                  "chain_of_thought, answer; or LoGiPT conversations), or FOLIO rows")
    ver.add_argument("--traces", action="store_true",
                     help="verify each record's 'response' (Thought/Action steps) instead of the gold proof")
    ver.add_argument("--limit", type=int, default=None, help="first N records only")
    ver.add_argument("--output-dir", default="runs", help="where runs/verify/<run> is written (default: runs)")
    ver.set_defaults(fn=cmd_verify)
    from ftlab.data.socsci_prepare import add_socsci_verbs  # prepare-socsci
    add_socsci_verbs(sub)
    from ftlab.data.traces import add_traces_verbs  # sample, filter
    add_traces_verbs(sub)
    from ftlab.runs.sweep_cli import add_sweep_verbs  # sweep
    add_sweep_verbs(sub)
    from ftlab.launch.launcher import add_launch_verbs  # launch
    add_launch_verbs(sub)
    from ftlab.launch.planner import add_plan_verbs  # plan
    add_plan_verbs(sub)
    from ftlab.report.build import add_report_verbs  # report
    add_report_verbs(sub)
    add_use_verbs(sub)
    from ftlab.pretrain_cli import add_verbs  # the pretraining verbs (prepare-corpus, ...)

    add_verbs(sub)
    return p


def add_use_verbs(sub: argparse._SubParsersAction) -> None:
    """chat, serve, export: using what was trained."""
    what = "a model (embedded name, directory, hub id), an adapter directory, or a training run directory"
    chat = sub.add_parser("chat", help="talk to a model in the terminal, on the chat template it was trained with",
                          description="interactive chat; /help inside lists the commands")
    chat.add_argument("model", help=what)
    chat.add_argument("--adapter", help="a LoRA adapter directory to apply on top of MODEL")
    chat.add_argument("overrides", nargs="*", help="generation settings, e.g. temperature=0.7 max_new_tokens=256")
    chat.set_defaults(fn=cmd_chat)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                         description="serve /v1/chat/completions, /v1/completions and /v1/models")
    srv.add_argument("model", help=what)
    srv.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                     help="a LoRA adapter on the same base, requested as model NAME (repeatable)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default 16)")
    srv.set_defaults(fn=cmd_serve)
    exp = sub.add_parser("export", help="merged weights, GGUF (llama.cpp, Ollama), model card, Hub upload",
                         description="export a run, adapter or model directory for use outside ftlab")
    exp.add_argument("source", help="a training run directory, an adapter directory or a model directory")
    exp.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    exp.add_argument("--merge", action="store_true", help="fold a LoRA adapter into a full-precision copy of its base")
    exp.add_argument("--gguf", choices=["f32", "f16", "q8_0"], help="also write model.gguf of this type + Modelfile")
    exp.add_argument("--push-to-hub", metavar="REPO", help="upload the exported directory to this Hub repository")
    exp.add_argument("--private", action="store_true", help="create the Hub repository private")
    exp.add_argument("--dry-run", action="store_true", help="with --push-to-hub: list what would be sent, send nothing")
    exp.set_defaults(fn=cmd_export)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`--output o.jsonl eval.n=4`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    setup_console_logging(args.verbose)
    stop_signals = (signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: Slurm's warning ahead of a time limit (sbatch --signal)
    previous = {s: signal.signal(s, raise_terminated) for s in stop_signals} if _main_thread() else {}
    try:
        return args.fn(args)
    except UserError as e:
        print(f"ftlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"ftlab: {e}", file=sys.stderr)
        return Terminated.exit_code
    except KeyboardInterrupt:
        print("ftlab: interrupted", file=sys.stderr)
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def raise_terminated(signum: int, frame: object) -> None:
    """SIGTERM (Slurm time limit, preemption, `kill`) or SIGUSR1 (Slurm's warning before them) unwinds like Ctrl-C:
    runs are marked interrupted.
    The training loop installs its own handler, which first finishes the step and saves a checkpoint."""
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
