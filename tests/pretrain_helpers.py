"""Small builders for the pretraining tests: a synthetic categorised corpus and a tiny pretraining recipe."""
from __future__ import annotations

import json
from pathlib import Path

CATS = ["astro", "math", "bio"]
WORDS = {"astro": "star galaxy planet orbit light", "math": "prime number proof lemma theorem",
         "bio": "cell gene protein enzyme tissue"}


def write_corpus_jsonl(path: Path, n: int = 60, words: int = 40, extra: list[dict] | None = None) -> Path:
    """n documents over three categories; document i cycles through its category's five words."""
    with path.open("w") as f:
        for i in range(n):
            cat = CATS[i % 3]
            w = WORDS[cat].split()
            text = " ".join(w[(i + j) % len(w)] for j in range(words + i % 7))
            f.write(json.dumps({"id": f"doc{i}", "category": cat, "text": text, "title": "t"}) + "\n")
        for row in extra or []:
            f.write(json.dumps(row) + "\n")
    return path


def make_corpus(tmp: Path, name: str = "corpus", **kw) -> Path:
    from ftlab.data.corpus import PrepareSettings, prepare_corpus

    src = tmp / f"{name}.jsonl"
    write_corpus_jsonl(src, **kw)
    prepare_corpus(PrepareSettings(input=str(src), out=str(tmp / name), workers=0, max_examples_per_split=None,
                                   val_fraction=0.2, test_fraction=0.1))
    return tmp / name


def pretrain_recipe(tmp: Path, corpus: Path, **sections) -> Path:
    import yaml

    from tests.helpers import TINY_SCRATCH

    recipe = {
        "name": "pt", "kind": "pretrain", "output_dir": str(tmp / "runs"), "seed": 0,
        "model": {"scratch": TINY_SCRATCH},
        "pretrain": {"corpus": str(corpus), "seq_len": 16, "val_windows": 8},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "constant"},
        "train": {"method": "pretrain", "max_steps": 4, "batch_size": 4, "grad_accum": 1},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path = tmp / "pretrain.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path
