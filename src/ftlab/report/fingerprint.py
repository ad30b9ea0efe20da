"""Short content hashes that say whether two numbers were measured the same way.

An evaluation run records them in metrics.json (`eval_set_hash`, `tokenizer_hash`, `chat_template_hash`); a
training run's tokenizer and template are hashed from the files it saved (final/ or best/), by the same
definition, so an evaluation and a training run can be compared too.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

NO_TEMPLATE = "none"  # prompts were plain text: no chat template took part


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-256 of `obj` as canonical JSON."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def eval_set_hash(examples: Iterable[Any]) -> str:
    """The examples' content (id, question, gold answer) in order: another file, split, slice or edit of the
    data changes it; the prompt format (shots, template) does not, it has its own entries."""
    return digest([[ex.id, ex.question, ex.gold] for ex in examples])


def vocab_hash(vocab: dict[str, int]) -> str:
    return digest(sorted(vocab.items(), key=lambda kv: kv[1]))


def template_hash(template: Any) -> str:
    return digest(template) if template else NO_TEMPLATE


def tokenizer_fingerprint(tokenizer: Any, chat_template: bool) -> dict[str, str]:
    """Hashes of a loaded tokenizer's vocabulary (added tokens included) and, when prompts go through it,
    its chat template."""
    return {"tokenizer_hash": vocab_hash(tokenizer.get_vocab()),
            "chat_template_hash": template_hash(tokenizer.chat_template) if chat_template else NO_TEMPLATE}


def saved_tokenizer_fingerprint(folder: Path, chat_template: bool) -> dict[str, str]:
    """The same hashes from a saved tokenizer (tokenizer.json, chat_template.jinja or tokenizer_config.json);
    {} when the folder holds none."""
    from tokenizers import Tokenizer

    if not (folder / "tokenizer.json").is_file():
        return {}
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    return {"tokenizer_hash": vocab_hash(vocab),
            "chat_template_hash": template_hash(template) if chat_template else NO_TEMPLATE}
