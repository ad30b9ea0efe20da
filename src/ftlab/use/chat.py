"""`ftlab chat MODEL_OR_RUN [--adapter DIR] [key=value ...]`: talk to a model in the terminal.

The REPL around `ftlab.use.conversation.ChatSession`, which renders turns as SFT did, keeps the KV cache
across turns and streams the answer. Here: the command-line settings (checked before the model loads, so a
typo costs nothing), which chat template a training run used, and the commands. Every mistake inside the
session (an unknown command, a bad /set value, an unwritable /save file) is one line and the session goes
on; Ctrl-C stops an answer (kept as far as it got, marked [interrupted]) and Ctrl-D or /exit quits.
"""
from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Callable, TextIO

from ftlab.errors import UserError
from ftlab.use.conversation import ChatSession, ChatSettings, Reply

PROMPT = ">>> "
SETTING_TYPES: dict[str, type] = {"temperature": float, "top_p": float, "max_new_tokens": int, "seed": int,
                                  "system": str}
HELP = """\
/system TEXT         set the system prompt (/system alone: none, i.e. the template's default); history is kept
/retry               generate the last answer again (greedy: the same; sampling: a new draw)
/undo                drop the last question and its answer
/set KEY VALUE       temperature, top_p or max_new_tokens (/set alone shows the settings)
/save FILE           append the conversation to FILE as one {"messages": [...]} JSONL row (data.task: generic)
/exit                quit (Ctrl-D too)
/help                this list
Ctrl-C stops an answer (the part generated is kept, marked [interrupted]); //text sends a message starting with /"""
COMMANDS = ("/system", "/retry", "/undo", "/set", "/save", "/exit", "/quit", "/help")


def parse_overrides(overrides: list[str]) -> ChatSettings:
    """key=value pairs from the command line -> settings; an unknown key names the closest valid one."""
    values: dict[str, Any] = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"{item!r}: settings are key=value ({', '.join(SETTING_TYPES)})")
        if key not in SETTING_TYPES:
            close = difflib.get_close_matches(key, SETTING_TYPES, n=1, cutoff=0.0)
            raise UserError(f"unknown setting {key!r}; did you mean {close[0]!r}? (valid: {', '.join(SETTING_TYPES)})")
        kind = SETTING_TYPES[key]
        if key == "system":
            values[key] = value or None  # system= (empty): none, i.e. the template's default
            continue
        try:
            values[key] = kind(value)
        except ValueError:
            raise UserError(f"{key} must be {'an integer' if kind is int else 'a number'}; got {value!r}") from None
    settings = ChatSettings(**values)
    settings.validate()
    return settings


def run_chat_template(run: Path) -> bool:
    """Whether the run's SFT data went through the chat template (`data.chat_template` in its config.yaml)."""
    import yaml

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{run / 'config.yaml'}: cannot read the run's recipe ({e})") from None
    data = cfg.get("data") if isinstance(cfg, dict) else None
    return bool(data.get("chat_template", True)) if isinstance(data, dict) else True


class ChatREPL:
    """Reads lines with `read_line` (`input`: line editing where readline is there), writes to `out`."""

    def __init__(self, session: ChatSession, out: TextIO | None = None,
                 read_line: Callable[[str], str] = input):
        self.session = session
        self.out = out or sys.stdout
        self.read_line = read_line
        session.notice = self.say

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def write(self, piece: str) -> None:
        if piece:
            self.out.write(piece)
            self.out.flush()

    def run(self) -> None:
        """Until /exit or end of input (Ctrl-D)."""
        while True:
            try:
                line = self.read_line(PROMPT)
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:  # at the prompt: nothing to stop
                self.say("\n(Ctrl-D or /exit quits)")
                continue
            try:
                if not self.handle(line):
                    return
            except UserError as e:
                self.say(f"error: {e}")
            except KeyboardInterrupt:  # outside an answer (answers catch their own)
                self.say("\n(interrupted)")

    def handle(self, line: str) -> bool:
        """One input line; False ends the session."""
        text = line.strip()
        if not text:
            return True
        if not text.startswith("/") or text.startswith("//"):
            self.show(self.session.ask(text[1:] if text.startswith("//") else text, on_text=self.write))
            return True
        command, _, arg = text.partition(" ")
        arg = arg.strip()
        if command in ("/exit", "/quit"):
            return False
        if command == "/help":
            self.say(HELP)
        elif command == "/system":
            self.session.set_system(arg or None)
            self.say("(system prompt set)" if arg else "(system prompt removed)")
        elif command == "/retry":
            self.show(self.session.retry(on_text=self.write))
        elif command == "/undo":
            self.session.undo()
            self.say("(dropped the last exchange)")
        elif command == "/set":
            self.set(arg)
        elif command == "/save":
            self.save(arg)
        else:
            close = difflib.get_close_matches(command, COMMANDS, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            self.say(f"unknown command {command}; {hint}/help lists the commands")
        return True

    def show(self, reply: Reply) -> None:
        """End the streamed answer: its line, and why it stopped when that was not the model's choice."""
        if reply.finish_reason == "interrupted" and not reply.token_ids:
            self.say("\n(interrupted before the first token; nothing kept)")
        elif reply.finish_reason == "interrupted":
            self.say(" [interrupted]")
        elif reply.finish_reason == "length":
            self.say(f" [max_new_tokens={self.session.settings.max_new_tokens} reached]")
        else:
            self.say("")

    def set(self, arg: str) -> None:
        key, _, value = arg.replace("=", " ", 1).partition(" ")  # "/set top_p 0.9" or "/set top_p=0.9"
        if not key:
            s = self.session.settings
            self.say(f"temperature={s.temperature} top_p={s.top_p} max_new_tokens={s.max_new_tokens} seed={s.seed}")
            return
        if not value.strip():
            raise UserError(f"/set {key} needs a value")
        self.session.update(key, value.strip())
        self.say(f"({key}={getattr(self.session.settings, key)})")

    def save(self, arg: str) -> None:
        if not arg:
            raise UserError("/save needs a file name")
        n = self.session.save(arg)
        self.say(f"(saved {n} messages to {arg})")


def banner(label: str, session: ChatSession, layout: str) -> str:
    s = session.settings
    sampling = "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top_p {s.top_p}, seed {s.seed}"
    context = f"context {session.context_window} tokens" if session.context_window else "context unlimited"
    return (f"ftlab chat: {label}, {layout}, {context}; {sampling}, max_new_tokens {s.max_new_tokens}\n"
            "/help lists the commands; Ctrl-C stops an answer, Ctrl-D or /exit quits")


def run_chat(model: str, adapter: str | None = None, overrides: list[str] | None = None) -> None:
    """`ftlab chat`: load the model (or the run's final model and tokenizer) and talk until /exit or Ctrl-D."""
    from ftlab.use.source import load_source, resolve_source

    settings = parse_overrides(list(overrides or []))  # before the model loads: a typo costs nothing
    source = resolve_source(model, adapter)
    template = run_chat_template(source.run) if source.run is not None else True
    loaded, tokenizer = load_source(source)
    session = ChatSession(loaded, tokenizer, settings, chat_template=template)
    if session.chat_template:
        layout = "the run's chat template" if source.run is not None else "its chat template"
    else:
        layout = "plain text (the run trained without the chat template)" if source.run is not None and not template \
            else "plain text (no chat template)"
    if sys.stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    print(banner(source.label, session, layout), flush=True)
    ChatREPL(session).run()
