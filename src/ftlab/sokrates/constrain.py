"""Constrained decoding of option traces: a per-row logits hook for `HFEngine` (`logits_processor=`).

Once a line of a row's output begins with "Action:", the rest of that line can only spell

    Action: <Option type="NAME" args="[i, j, ...]" />

with NAME an option of the vocabulary (as `format_action` writes it), the number of args the option
takes, and every index below premises + facts derived so far (so a step cannot cite itself or a later
one). A token that would break that is masked to -inf, EOS included until the tag is closed; after the
tag only a newline or EOS may follow. Everything else (the Thought lines) is left alone. The hook
changes what is picked, not the reported log-probs, which stay the raw model's.

How it stays cheap: per row it decodes only the current line (from the last token holding a newline),
and the allowed (or banned) token ids depend on a small key - the text after "Action:" and the index
limit - so they are computed once per key over the few thousand tokens that can occur inside a tag
and cached. The facts derived so far are counted with `parse_steps` (as the verifier numbers them: every
step but CONCLUDE takes the next index), memoized per text. `stats` keeps calls and seconds.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch

from ftlab.sokrates.options import VOCABULARY, parse_steps

ACTION = "Action:"
HEAD, MID, END = ' <Option type="', '" args="[', '" />'
DIGITS = set("0123456789")


def _args_ok(args: str, limit: int | None, lo: int, hi: int | None, closed: bool) -> bool:
    """`args` (between "[" and "]"; `closed` once "]" is written) is, or can still become, a valid list:
    ", "-separated indices without leading zeros, each < limit, between lo and hi of them."""
    if args == "":
        return lo == 0 if closed else hi != 0
    parts = args.split(",")
    if hi is not None and len(parts) > hi:
        return False
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if i > 0:
            if part == "" and last and not closed:
                continue  # the comma was just written; the space and digits come next
            if not part.startswith(" "):
                return False
            part = part[1:]
        if part == "":
            if last and not closed:
                continue
            return False
        if not set(part) <= DIGITS or (len(part) > 1 and part[0] == "0"):
            return False
        if limit is not None and int(part) >= limit:
            return False
    return not closed or len(parts) >= lo


def tag_state(rest: str, arity: dict[str, tuple[int, int | None]], limit: int | None) -> str:
    """What the text after "Action:" on one line is: 'complete', 'prefix' (can still become a valid tag)
    or 'bad'."""
    if len(rest) <= len(HEAD):
        return "prefix" if HEAD.startswith(rest) else "bad"
    if not rest.startswith(HEAD):
        return "bad"
    name, quote, rest = rest[len(HEAD):].partition('"')
    if not quote:
        return "prefix" if any(n.startswith(name) for n in arity) else "bad"
    if name not in arity:
        return "bad"
    rest = quote + rest
    if len(rest) <= len(MID):
        return "prefix" if MID.startswith(rest) else "bad"
    if not rest.startswith(MID):
        return "bad"
    args, close, tail = rest[len(MID):].partition("]")
    if not _args_ok(args, limit, *arity[name], closed=bool(close)):
        return "bad"
    if not close:
        return "prefix"
    if tail == END:
        return "complete"
    return "prefix" if END.startswith(tail) else "bad"


class OptionConstraint:
    """The hook: `OptionConstraint(tokenizer, premise_counts, eos_ids)`; `premise_counts[k]` is the number
    of premises of prompt k of the generate call (rows name their prompt). `options` limits the option
    names (FOLIO: CONCLUDE only); `arity` overrides how many args an option takes (PrOntoQA's CONCLUDE
    cites exactly one fact)."""

    def __init__(self, tokenizer: Any, premise_counts: list[int], eos_ids: set[int] | frozenset = frozenset(),
                 options: tuple[str, ...] | None = None, arity: dict[str, tuple[int, int | None]] | None = None,
                 cache_size: int = 20000):
        self.tokenizer, self.premises, self.eos = tokenizer, list(premise_counts), {int(e) for e in eos_ids}
        names = options or tuple(VOCABULARY)
        self.arity = {n: (arity or {}).get(n, (VOCABULARY[n].min_args, VOCABULARY[n].max_args)) for n in names}
        self.strings = token_strings(tokenizer)
        self.newline_ids = {i for i, s in enumerate(self.strings) if "\n" in s}
        # Tokens that can occur inside a tag (checked one by one for each new key), and tokens holding a
        # colon (the only way an ordinary line becomes an "Action:" line).
        tag_chars = set(HEAD + MID + END + "".join(self.arity) + "0123456789, ]")
        self.trie: dict = {}  # a character trie of the tokens that can occur in a tag (ids under the key None)
        for i, s in enumerate(self.strings):
            if s and set(s.split("\n")[0]) <= tag_chars:
                node = self.trie
                for ch in s:
                    node = node.setdefault(ch, {})
                node.setdefault(None, []).append(i)
        self.colon_tokens = [i for i, s in enumerate(self.strings) if ":" in s]
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.derived_memo: OrderedDict[str, int] = OrderedDict()
        self.stats = {"calls": 0, "rows": 0, "seconds": 0.0, "constrained_rows": 0}

    # -- the hook -----------------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, requests: list[int], tokens: list[list[int]]) -> torch.Tensor:
        start = time.perf_counter()
        scores = None
        for row, (request, ids) in enumerate(zip(requests, tokens)):
            allowed, banned = self.row_mask(request, ids)
            if allowed is None and banned is None:
                continue
            if scores is None:
                scores = logits.clone()  # the raw logits stay untouched (log-probs come from them)
            if allowed is not None:
                keep = scores[row, allowed]
                scores[row] = float("-inf")
                scores[row, allowed] = keep
            else:
                scores[row, banned] = float("-inf")
        self.stats["calls"] += 1
        self.stats["rows"] += len(requests)
        self.stats["seconds"] += time.perf_counter() - start
        return logits if scores is None else scores

    def row_mask(self, request: int, ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(allowed ids, None) inside an Action line; (None, banned ids) elsewhere; (None, None): no mask."""
        line, before = self.current_line(ids)
        if line.startswith(ACTION):
            self.stats["constrained_rows"] += 1
            limit = self.premises[request] + self.derived(before)
            allowed = self.cached(("in", line[len(ACTION):], limit), lambda: self.allowed_ids(line, limit))
            return (allowed if len(allowed) else None), None
        key = ("out", line if ACTION.startswith(line) else None)
        banned = self.cached(key, lambda: self.banned_ids(key[1]))
        return None, (banned if len(banned) else None)

    # -- state of a row -----------------------------------------------------------------------------
    def current_line(self, ids: list[int]) -> tuple[str, list[int] | None]:
        """The text of the row's last line, and the tokens before it (None when the line is the first)."""
        cut = None
        for k in range(len(ids) - 1, -1, -1):
            if ids[k] in self.newline_ids:
                cut = k
                break
        if cut is None:
            return self.decode(ids), None
        return self.decode(ids[cut:]).rsplit("\n", 1)[-1], ids

    def derived(self, ids: list[int] | None) -> int:
        """Facts derived before the current line: non-CONCLUDE steps, as the verifier numbers them (a thought
        still waiting for its Action line is the current step, not a derived fact)."""
        if ids is None:
            return 0
        text = self.decode(ids).rsplit("\n", 1)[0]
        if text not in self.derived_memo:
            steps = parse_steps(text)
            if steps and steps[-1].action_text is None:
                steps = steps[:-1]
            self.derived_memo[text] = sum(
                not (s.action.option == "CONCLUDE" if s.action else 'type="CONCLUDE"' in (s.action_text or ""))
                for s in steps)
            if len(self.derived_memo) > self.cache_size:
                self.derived_memo.popitem(last=False)
        return self.derived_memo[text]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- which tokens --------------------------------------------------------------------------------
    def cached(self, key: tuple, compute: Any) -> torch.Tensor:
        found = self.cache.get(key)
        if found is None:
            found = self.cache[key] = compute()
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return found

    def candidate_ok(self, rest: str, s: str, limit: int | None) -> bool:
        """Appending token text `s` to an Action line whose text after "Action:" is `rest` keeps it valid;
        a newline must close a complete tag."""
        line, newline, _ = (rest + s).partition("\n")
        state = tag_state(line, self.arity, limit)
        return state == "complete" if newline else state != "bad"

    def lines_ok(self, lines: list[str]) -> bool:
        """Lines a token writes (all but the last end with its newlines): those that are Action lines valid
        so far, and complete where a newline follows."""
        return all(self.candidate_ok(line[len(ACTION):], "\n" if k < len(lines) - 1 else "", None)
                   for k, line in enumerate(lines) if line.startswith(ACTION))

    def allowed_ids(self, line: str, limit: int) -> torch.Tensor:
        """A walk down the token trie that leaves a branch as soon as its text cannot become a tag: only the
        viable tokens are visited, not the vocabulary. A newline may follow a complete tag only."""
        rest = line[len(ACTION):]
        ok = list(self.eos) if tag_state(rest, self.arity, limit) == "complete" else []
        stack = [(self.trie, rest)]
        while stack:
            node, text = stack.pop()
            for ch, child in node.items():
                if ch is None:
                    continue
                if ch == "\n":
                    if tag_state(text, self.arity, limit) == "complete":
                        ok += _subtree_ids(child)
                elif tag_state(text + ch, self.arity, limit) != "bad":
                    ok += child.get(None, [])
                    stack.append((child, text + ch))
        return torch.tensor(sorted(ok), dtype=torch.long)

    def banned_ids(self, prefix: str | None) -> torch.Tensor:
        """Outside a tag: tokens that would start an "Action:" line with something that is not a tag. The index
        limit is not known here; no single token reaches the args anyway, the next steps check them."""
        if prefix is None:  # the line is not a beginning of "Action:": only a newline inside a token starts one
            lines = [(i, self.strings[i].split("\n")[1:]) for i in self.colon_tokens if "\n" in self.strings[i]]
        else:
            lines = [(i, (prefix + self.strings[i]).split("\n")) for i in self.colon_tokens]
        return torch.tensor([i for i, written in lines if not self.lines_ok(written)], dtype=torch.long)


def _subtree_ids(node: dict) -> list[int]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out += n.get(None, [])
        stack += [c for k, c in n.items() if k is not None]
    return out


def token_strings(tokenizer: Any) -> list[str]:
    """What each token id adds to a decoded text. Decoding an id alone drops a leading space in some
    tokenizers (SentencePiece), so each is decoded after an anchor token and the anchor's text removed."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    base = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)
    return [t.removeprefix(base) for t in texts]
