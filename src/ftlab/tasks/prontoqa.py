"""PrOntoQA: True/False questions over fictional ontologies, with gold chain-of-thought.

Accepted inputs (one file may mix the record shapes of the first two):
* the authors' normalized records (JSONL or a JSON list): `question` = context, `query` =
  "True or false: ..." (Logic-LM files: "Is the following statement true or false? ..."),
  `chain_of_thought` (list of sentences, optional), `answer` ("True"/"False"), optional `hops`, `id`;
* LoGiPT conversations (jzfeng/LoGiPT-data): records with a `conversations` or `messages` list of
  turns, read by `parse_logipt_conversation`;
* the authors' raw generator JSON `{"example1": {"test_example": {...}}, ...}`.

Queries are normalized to "True or false: <statement>" so every source is prompted the same way.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from ftlab.data.jsonl import iter_jsonl
from ftlab.errors import UserError, not_utf8
from ftlab.tasks.base import Example, Task, load_hub_records
from ftlab.tasks.scoring import (
    as_text,
    majority_metrics,
    paired,
    primary_answer,
    two_rule_metrics,
    two_rule_score,
)

AUTHORS_FIELDS = ("question", "query", "answer")
PROOF_STYLES = ("forward", "backward", "closure")
EXTRACTION_RULE = (
    "strict: the last 'answer is True/False' (case-insensitive, optional ':' or '**'); flexible: the last "
    "standalone word 'true' or 'false' anywhere in the output. Primary (accuracy) = strict, else flexible: "
    "the strict answer when the strict rule finds one, otherwise the flexible one."
)
_STRICT_RE = re.compile(r"answer\s+is\s*:?\s*\**\s*(true|false)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"\b(true|false)\b", re.IGNORECASE)
# Query wordings seen in the wild, in front of the statement to judge.
_QUERY_PREFIXES = [
    re.compile(r"^\s*true\s+or\s+false\s*[:?]\s*", re.IGNORECASE),
    re.compile(r"^.*?\btrue\s*,?\s+or\s+false\s*\?\s*", re.IGNORECASE | re.DOTALL),
    re.compile(r"^.*?\btrue\s*,\s*false\s*,?\s*or\s+unknown\s*\?\s*", re.IGNORECASE | re.DOTALL),
    re.compile(r"^\s*(?:prove|question)\s*:\s*", re.IGNORECASE),
]


def extract_true_false_strict(text: str) -> str | None:
    matches = _STRICT_RE.findall(as_text(text))
    return matches[-1].capitalize() if matches else None


def extract_true_false_flexible(text: str) -> str | None:
    matches = _WORD_RE.findall(as_text(text))
    return matches[-1].capitalize() if matches else None


def normalize_tf_label(value: Any) -> str:
    """'True'/'true'/True/'A' -> 'True'; 'False'/'B' -> 'False'; anything else is an error."""
    if isinstance(value, bool):
        return "True" if value else "False"
    text = str(value).strip().rstrip(".").lower()
    if text in ("true", "a", "a) true"):
        return "True"
    if text in ("false", "b", "b) false"):
        return "False"
    raise ValueError(f"answer {value!r} is not True/False")


def query_statement(query: str) -> str:
    """'True or false: Max is sour.' / 'Is the following statement true or false? Max is sour.' -> 'Max is sour.'"""
    text = query.strip()
    for prefix in _QUERY_PREFIXES:
        stripped = prefix.sub("", text, count=1)
        if stripped != text:
            return stripped.strip()
    return text


# -- LoGiPT conversations -------------------------------------------------------------------------
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model", "bot", "chatgpt"}
_OPTION_RE = re.compile(r"(?:correct\s+)?option\s+is\s*:?\s*\(?([ABC])\)?(?:\s*\)?\s*(true|false|unknown))?",
                        re.IGNORECASE)
_CONTEXT_RE = re.compile(
    r"context\s*:\s*(.*?)(?=\n\s*(?:reasoning|question|query|options|statement)\s*:|\Z)",
    re.IGNORECASE | re.DOTALL,
)
_QUESTION_RE = re.compile(r"(?:question|query|statement)\s*:\s*(.*)", re.IGNORECASE | re.DOTALL)


def _turns(record: dict) -> list[tuple[str, str]]:
    """(role, text) for each turn; roles normalized to 'user' / 'assistant' / 'system'."""
    raw = record.get("conversations", record.get("messages"))
    if not isinstance(raw, list) or not raw:
        raise ValueError("no non-empty 'conversations' or 'messages' list")
    turns = []
    for t in raw:
        if not isinstance(t, dict):
            raise ValueError("a conversation turn is not an object")
        role = str(t.get("from", t.get("role", ""))).strip().lower()
        text = t.get("value", t.get("content", ""))
        role = "user" if role in _USER_ROLES else "assistant" if role in _ASSISTANT_ROLES else role
        turns.append((role, text if isinstance(text, str) else ""))
    return turns


def _logipt_answer(text: str) -> str | None:
    """'So, the correct option is: B) False' -> 'False'; falls back to 'answer is X', then the last word."""
    options = _OPTION_RE.findall(text)
    if options:
        letter, word = options[-1]
        return word.capitalize() if word else {"A": "True", "B": "False", "C": "Unknown"}[letter.upper()]
    unknown = re.findall(r"answer\s+is\s*:?\s*(unknown)\b", text, re.IGNORECASE)
    return extract_true_false_strict(text) or ("Unknown" if unknown else None) or extract_true_false_flexible(text)


def _logipt_query(user_texts: list[str]) -> str | None:
    """The statement to judge, from the last user turn that asks one."""
    for text in reversed(user_texts):
        for line in text.splitlines():
            if re.search(r"true\s*,?\s+(?:false|or\s+false)", line, re.IGNORECASE) and "?" in line:
                statement = line.split("?", 1)[1].strip()  # "...true, false, or unknown? Alex is not happy."
                if statement:
                    return statement
            if re.match(r"\s*true\s+or\s+false\s*:", line, re.IGNORECASE):
                return query_statement(line)
        m = _QUESTION_RE.search(text)
        if m and m.group(1).strip():
            return query_statement(m.group(1).strip().splitlines()[0])
    return None


def parse_logipt_conversation(record: dict) -> dict:
    """Read one LoGiPT (Vicuna-style) conversation into the authors' record shape.

    Tolerant of the turn layout: turns under `conversations` ({"from", "value"}) or `messages`
    ({"role", "content"}); the context is the text after "Context:" in the first user turn (the
    whole turn when there is no such label), the statement comes from the question turn, the
    reasoning chain is the non-empty lines of the assistant turns before the final one, and the
    answer is read from the final assistant turn ("So, the correct option is: A) True").
    Returns {"id", "question", "query", "chain_of_thought", "answer"}; ValueError when a part is missing.
    """
    turns = _turns(record)
    user = [text for role, text in turns if role == "user"]
    assistant = [text for role, text in turns if role == "assistant"]
    if not user or not assistant:
        raise ValueError("conversation needs at least one user and one assistant turn")
    m = _CONTEXT_RE.search(user[0])
    context = (m.group(1) if m else user[0]).strip()
    statement = _logipt_query(user)
    if not context or not statement:
        raise ValueError("cannot find the context and the question in the conversation")
    answer = _logipt_answer(assistant[-1])
    if answer is None:
        raise ValueError("cannot find the answer in the last assistant turn")
    reasoning = assistant[:-1] if len(assistant) > 1 else [assistant[0]]
    chain = [line.strip() for text in reasoning for line in text.splitlines() if line.strip()]
    if len(assistant) == 1:  # one turn: drop its answer line from the reasoning
        chain = [line for line in chain if not (_OPTION_RE.search(line) or _STRICT_RE.search(line))]
    return {
        "id": record.get("id"),
        "question": context,
        "query": f"True or false: {statement}",
        "chain_of_thought": chain,
        "answer": answer,
    }


# -- file reading --------------------------------------------------------------------------------
def _records_from_json(obj: Any, path: str) -> list[tuple[str, dict]]:
    """(location, record) from a whole-file JSON value: a list of records or the raw generator dict."""
    if isinstance(obj, list):
        return [(f"{path}: record {i + 1}", r) for i, r in enumerate(obj)]
    if isinstance(obj, dict):
        if "conversations" in obj or "messages" in obj or "query" in obj:
            return [(f"{path}: record 1", obj)]
        out = []
        for key, value in obj.items():  # {"example1": {"test_example": {...}, "in_context_example0": ...}}
            inner = value.get("test_example") if isinstance(value, dict) else None
            if not isinstance(inner, dict):
                raise UserError(f"{path}: entry {key!r} has no 'test_example' object "
                                f"(expected the PrOntoQA generator layout)")
            out.append((f"{path}: entry {key!r}", {"id": key, **inner}))
        return out
    raise UserError(f"{path}: expected a JSON list or object, got {type(obj).__name__}")


def read_prontoqa_records(path: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(location, record) pairs from a JSONL file or a whole-file JSON (list or generator dict)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: file not found")
    with open(path, "rb") as f:  # only to tell JSON from JSONL; bytes that are not UTF-8 are reported below
        head = f.read(4096).decode("utf-8", errors="replace").lstrip()
    if path.endswith(".json") or head.startswith("["):
        raw = Path(path).read_bytes()
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise not_utf8(path, raw, e) from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        records = _records_from_json(obj, path)
    else:
        records = [(f"{path}:{lineno}", r) for lineno, r in iter_jsonl(path)]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UserError(f"{path}: file is empty (no records)")
    return records


def _check_fields(where: str, record: dict) -> None:
    if "conversations" in record or "messages" in record:
        return
    missing = [k for k in AUTHORS_FIELDS if k not in record]
    if missing:
        raise UserError(f"{where}: missing field {missing[0]!r} (required: {', '.join(AUTHORS_FIELDS)}, "
                        f"or a LoGiPT 'conversations' list)")


# -- goal-directed (backward) proofs -----------------------------------------------------------
_SENTENCE_RE = re.compile(r"[^.]+\.")
_RULE_SUBJECT_RE = re.compile(r"^(?:every|each)\s+(\w+)\s+is\b|^(\w+)\s+are\b", re.IGNORECASE)


def _singular(concept: str) -> str:
    """'Shumpuses' -> 'shumpus' (the authors' plural of every '-us' concept is '-uses')."""
    word = concept.lower()
    return word[:-2] if word.endswith("uses") else word


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def backward_proof(context: str, statement: str, chain: list[str], gold: str) -> str | None:
    """The forward gold chain rewritten as a goal-directed search, or None when it cannot be.

    Forward proofs must pick, at every step, the one of two parent concepts that leads to the queried
    property: a look-ahead of several hops. Read backwards every step is a lookup. In the authors'
    files (and ftlab's generator) exactly two rules mention the queried property, one of them about a
    concept that appears nowhere else; every concept on the proof path is the object of exactly one
    rule. So the search is: try the property rules in context order, drop the dead end, then climb
    down the unique rules until the entity's fact. For "Sam is not temperate." (True):

        Claim: Sam is not temperate. Every shumpus is temperate. Nothing says Sam is a shumpus.
        Every brimpus is not temperate. Impuses are brimpuses. Numpuses are impuses. Sam is a numpus.
        So Sam is not temperate, which is the claim. The answer is True.
    """
    chain = [s.strip() for s in chain if str(s).strip()]
    if len(chain) < 3 or len(chain) % 2 == 0:
        return None
    fact, rules, conclusion = chain[0], chain[1::2], chain[-1]
    prop = conclusion.rstrip(".").split()[-1]
    entity = fact.split()[0]
    mentions = [s.strip() for s in _SENTENCE_RE.findall(context)
                if re.search(rf"\b{re.escape(prop)}\b", s) and not s.strip().startswith(entity + " ")]
    if rules[-1] not in mentions:
        return None
    steps = [f"Claim: {statement}"]
    for rule in mentions[:mentions.index(rules[-1])]:  # dead ends tried before the right rule
        m = _RULE_SUBJECT_RE.match(rule)
        if m is None:
            return None
        concept = _singular(m.group(1) or m.group(2))
        steps += [rule, f"Nothing says {entity} is {_article(concept)} {concept}."]
    steps += [rules[-1], *reversed(rules[:-1]), fact]
    verdict = "which is the claim" if gold == "True" else "which contradicts the claim"
    steps.append(f"So {conclusion.rstrip('.')}, {verdict}. The answer is {gold}.")
    return " ".join(steps)


def closure_proof(context: str, statement: str, gold: str) -> str | None:
    """Forward chaining over the whole ontology from the entity's facts, breadth first, or None.

    Every step looks rules up by their *subject* (the first words of a sentence), which a small model
    can do by matching the concept and copying what follows it; no step needs to know in advance which
    parent concept leads to the queried property. One line per concept, in the order concepts were
    reached: its parent concepts and, when stated, the queried property; it stops at that property.
    For "Sam is not temperate." (True):

        Sam is a gorpus. Sam is a numpus. Gorpus: dumpus. Numpus: impus, rompus. Dumpus: nothing.
        Impus: brimpus, zumpus. Rompus: nothing. Brimpus: tumpus, not temperate, sterpus.
        So Sam is not temperate, which is the claim. The answer is True.
    """
    from ftlab.sokrates.logic import (
        CONCEPT,
        Fact,
        LogicParseError,
        Rule,
        nouns,
        parse_premises,
        parse_sentence,
        split_sentences,
    )

    try:
        premises = parse_premises(context)
        claim = parse_sentence(statement, nouns(split_sentences(context)))
    except LogicParseError:
        return None
    if not isinstance(claim, Fact):
        return None
    rules: dict[str, list[Rule]] = defaultdict(list)
    for p in premises:
        if isinstance(p, Rule):
            rules[p.subject].append(p)
    facts = [p for p in premises if isinstance(p, Fact) and p.entity == claim.entity and p.kind == CONCEPT]
    reached = [f.pred for f in facts]
    steps, found = [f"{f.text()}." for f in facts], None
    for concept in reached:  # grows while it is read: breadth first
        said = []
        for rule in rules[concept]:
            if rule.kind == CONCEPT:
                said.append(rule.pred)
                if rule.pred not in reached:
                    reached.append(rule.pred)
            elif rule.pred == claim.pred:
                said.append(f"not {rule.pred}" if rule.negated else rule.pred)
                found = rule
        steps.append(f"{concept.capitalize()}: {', '.join(said) or 'nothing'}.")
        if found:
            break
    if found is None or (found.negated == claim.negated) != (gold == "True"):
        return None
    verdict = "which is the claim" if gold == "True" else "which contradicts the claim"
    steps.append(f"So {found.apply(claim.entity).text()}, {verdict}. The answer is {gold}.")
    return " ".join(steps)


def lookup_turn(context: str, prop: str) -> tuple[str, str]:
    """A retrieval drill: which context sentences mention `prop`, quoted in context order.

    Every goal-directed proof starts by finding the rules that end in the claimed property, i.e.
    recalling a sentence's beginning from its last word, the step small models get wrong most
    often; these turns practise it on their own.
    """
    sentences = [s.strip() for s in _SENTENCE_RE.findall(context) if re.search(rf"\b{re.escape(prop)}\b", s)]
    return f"Which sentences say whether something is {prop}?", " ".join(sentences) or "None."


class ProntoQATask(Task):
    """PrOntoQA True/False with chain-of-thought targets ('<proof sentences> The answer is True.').

    `proof="forward"` (default) supervises the authors' chain of thought as written;
    `proof="backward"` supervises the same proof as a goal-directed search (see `backward_proof`),
    which a small model learns far more easily. Prompts and scoring are the same for both.
    """

    name = "prontoqa"
    required_fields = AUTHORS_FIELDS
    shot_examples = (
        (
            "Every lempus is a gorpus. Lempuses are not sour. Gorpuses are bright. Each zumpus is not bright. "
            "Rex is a lempus.\n\nTrue or false: Rex is bright.",
            "Rex is a lempus. Every lempus is a gorpus. Rex is a gorpus. Gorpuses are bright. Rex is bright. "
            "The answer is True.",
        ),
        (
            "Each vumpus is cold. Yumpuses are vumpuses. Every numpus is not cold. Each yumpus is shy. "
            "Wren is a yumpus.\n\nTrue or false: Wren is not cold.",
            "Wren is a yumpus. Yumpuses are vumpuses. Wren is a vumpus. Each vumpus is cold. Wren is cold. "
            "The answer is False.",
        ),
    )

    def to_example(self, record: dict, index: int) -> Example:
        fmt = "authors"
        if "conversations" in record or "messages" in record:
            record, fmt = {**parse_logipt_conversation(record), "hops": record.get("hops")}, "logipt"
        context, query = record["question"], record["query"]
        if not isinstance(context, str) or not isinstance(query, str):
            raise ValueError("'question' and 'query' must be strings")
        statement = query_statement(query)
        gold = normalize_tf_label(record["answer"])
        chain = record.get("chain_of_thought") or []
        if isinstance(chain, str):
            chain = [chain]
        target = self.target(context, statement, list(chain), gold, fmt)
        # ftlab's generator can add more claims about the same world and sentence lookups (training only)
        followups = [(self.instruction(f"True or false: {query_statement(q['query'])}"),
                      self.target(context, query_statement(q["query"]), list(q["chain_of_thought"]),
                                  normalize_tf_label(q["answer"]), fmt))
                     for q in record.get("more_queries") or []]
        followups += [lookup_turn(context, prop) for prop in record.get("lookups") or []]
        hops = record.get("hops")
        return Example(
            id=str(record.get("id") or f"prontoqa-{index}"),
            question=f"{context.strip()}\n\nTrue or false: {statement}",
            target=target,
            gold=gold,
            meta={"hops": int(hops) if hops is not None else None, "query": query, "statement": statement,
                  "chain_of_thought": list(chain), "format": fmt},
            followups=followups,
        )

    def target(self, context: str, statement: str, chain: list[str], gold: str, fmt: str) -> str:
        """The supervised response: the proof (as written, or goal-directed) and the verdict."""
        sep = "\n" if fmt == "logipt" else " "  # LoGiPT reasoning is line-structured, not sentences
        reasoning = sep.join(s.strip() for s in chain if str(s).strip())
        target = f"{reasoning}{sep}The answer is {gold}." if reasoning else f"The answer is {gold}."
        if self.proof == "backward" and fmt == "authors":
            target = backward_proof(context, statement, chain, gold) or target
        elif self.proof == "closure" and fmt == "authors":
            target = closure_proof(context, statement, gold) or target
        return target

    def __init__(self, proof: str = "forward"):
        if proof not in PROOF_STYLES:
            raise UserError(f"prontoqa: proof={proof!r} is not one of {', '.join(PROOF_STYLES)}")
        self.proof = proof

    def rejected_response(self, example: Example) -> str:
        """A wrong answer for preference pairs: the same proof with the opposite verdict (a goal-directed
        proof also says its conclusion agrees with / contradicts the claim the wrong way round)."""
        text, wrong = example.target, "False" if example.gold == "True" else "True"
        for said, unsaid in (("which is the claim", "which contradicts the claim"),
                             ("which contradicts the claim", "which is the claim")):
            if said in text:
                text = text.replace(said, unsaid)
                break
        head, found, tail = text.rpartition(f"The answer is {example.gold}")
        return f"{head}The answer is {wrong}{tail}" if found else f"{text} The answer is {wrong}."

    def load_records(self, source: str, split: str | None = None, limit: int | None = None) -> list[tuple[str, dict]]:
        """JSONL or whole-file JSON (list or generator dict) records, or hub rows; each has the authors'
        fields or a LoGiPT conversation. `generate:N[,hops=A-B][,seed=S]`: N problems from ftlab's
        generator (hop counts A..B cycled, default 1-5; seed 0), so a recipe can build its data itself."""
        if source.startswith("generate:"):
            return generated_records(source, limit)
        if not (os.path.exists(source) or source.endswith((".jsonl", ".json"))):
            located = [(f"{source}[{split or 'test'}]: record {i + 1}", r)
                       for i, r in enumerate(load_hub_records(source.removeprefix("hf:"), split or "test", limit))]
        else:
            located = read_prontoqa_records(source, limit)
        for where, record in located:
            _check_fields(where, record)
        return located

    def instruction(self, question: str) -> str:
        return f"{question}\nReason step by step, then end with \"The answer is True.\" or \"The answer is False.\""

    def extract_answer(self, text: str) -> str | None:
        return primary_answer(extract_true_false_strict(text), extract_true_false_flexible(text))

    def score(self, output: str, example: Example) -> dict[str, Any]:
        return two_rule_score(extract_true_false_strict(output), extract_true_false_flexible(output), example.gold)

    def aggregate(self, scores: list[dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
        metrics = two_rule_metrics(scores, EXTRACTION_RULE)
        metrics.update(majority_metrics(scores, examples))
        by_hops = _accuracy_by_hops(scores, examples)
        if by_hops:
            metrics["accuracy_by_hops"], metrics["n_by_hops"] = by_hops
        return metrics


def generated_records(source: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """Records of a `generate:N[,hops=A-B][,seed=S]` source (see `ProntoQATask.load_records`)."""
    from ftlab.tasks.prontoqa_gen import generate_prontoqa, max_supported_hops

    n, *options = source.removeprefix("generate:").split(",")
    settings = {"hops": "1-5", "seed": "0"}
    try:
        for option in options:
            key, value = option.split("=", 1)
            if key not in settings:
                raise ValueError(key)
            settings[key] = value
        low, _, high = settings["hops"].partition("-")
        records = generate_prontoqa(min(int(n), limit or int(n)), hops=list(range(int(low), int(high or low) + 1)),
                                    seed=int(settings["seed"]))
        if int(n) < 1:
            raise ValueError(n)
    except ValueError:
        raise UserError(f"prontoqa source {source!r}: expected generate:N[,hops=A-B][,seed=S] with N >= 1 and "
                        f"hops within 1-{max_supported_hops()}") from None
    return [(f"{source}: record {i + 1}", r) for i, r in enumerate(records)]


def _accuracy_by_hops(scores: Iterable[dict], examples: Iterable[Example]) -> tuple[dict, dict] | None:
    """({"1": acc, "3": acc}, {"1": n, ...}) over examples that have a hop count; None when none do."""
    groups: dict[int, list[bool]] = defaultdict(list)
    for s, ex in paired(list(scores), list(examples)):
        if ex.meta.get("hops") is not None:
            groups[int(ex.meta["hops"])].append(bool(s["correct"]))
    if not groups:
        return None
    keys = sorted(groups)
    return ({str(h): sum(groups[h]) / len(groups[h]) for h in keys}, {str(h): len(groups[h]) for h in keys})
