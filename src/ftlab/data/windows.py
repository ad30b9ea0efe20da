"""Random training windows of a prepared corpus: a pure function of (seed, step).

A window is seq_len + 1 consecutive tokens of one document (inputs = the first seq_len, targets = the last
seq_len). Window j of optimizer step s is drawn as

    rng = numpy Generator(PCG64(SeedSequence([seed, stream, s])))       stream 0: training, 1: validation
    documents = pool[rng.integers(len(pool), size=n)]                   uniform over the pool's documents
    offsets   = rng.integers(0, length[documents] - seq_len)           uniform start, window inside the document

so the (document, offset) of every window of every step can be recomputed from (seed, step) alone: a
resumed run sees the windows the uninterrupted run saw, and any batch can be rebuilt and shown as text
(`ftlab replay`). The pool is the split's documents of the chosen categories that hold at least seq_len + 1
tokens; shorter ones are dropped when the sampler is built, and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ftlab.data.corpus import Corpus
from ftlab.errors import UserError

log = logging.getLogger("ftlab")

TRAIN_STREAM, VAL_STREAM = 0, 1


def eligible_categories(corpus: Corpus, split: str, seq_len: int, min_docs: int = 1) -> list[str]:
    """Categories with at least `min_docs` documents of `split` long enough for a window, sorted by name."""
    docs = corpus.splits[split]
    long = docs[corpus.length[docs] >= seq_len + 1]
    counts: dict[str, int] = {}
    for d in long.tolist():
        counts[corpus.categories[d]] = counts.get(corpus.categories[d], 0) + 1
    return sorted(c for c, n in counts.items() if n >= min_docs)


def choose_categories(corpus: Corpus, k: int, seed: int, split: str, seq_len: int, min_docs: int = 1) -> list[str]:
    """The first k of a seeded shuffle of the eligible categories (sorted by name first, so the choice depends
    only on the seed and the corpus). Prefixes of one shuffle: for a seed, the k=2 choice contains the k=1
    choice, and so on."""
    pool = eligible_categories(corpus, split, seq_len, min_docs)
    if k > len(pool):
        raise UserError(f"pretrain.num_categories={k}, but only {len(pool)} categories of {corpus.path} have "
                        f"{min_docs} or more {split} documents of at least seq_len + 1 = {seq_len + 1} tokens "
                        f"({', '.join(pool) or 'none'})")
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order[:k]]


@dataclass
class WindowSampler:
    corpus: Corpus
    split: str
    categories: list[str] | None
    seq_len: int
    seed: int
    stream: int = TRAIN_STREAM
    pool: np.ndarray = field(init=False)
    dropped_short: int = field(init=False)

    def __post_init__(self) -> None:
        c, split = self.corpus, self.split
        if split not in c.splits:
            raise UserError(f"corpus {c.path} has no split {split!r} (it has {', '.join(c.splits)})")
        docs = c.splits[split]
        if self.categories is not None:
            wanted = set(self.categories)
            docs = docs[np.fromiter((c.categories[d] in wanted for d in docs.tolist()), dtype=bool, count=len(docs))]
            if not len(docs):
                present = sorted({c.categories[d] for d in c.splits[split].tolist()})
                raise UserError(f"no {split} documents of categories {sorted(wanted)} in corpus {c.path} "
                                f"(its {split} categories: {', '.join(present) or 'none'})")
        if not len(docs):
            raise UserError(f"corpus {c.path} has no {split} documents")
        keep = c.length[docs] >= self.seq_len + 1
        self.pool, self.dropped_short = docs[keep], int((~keep).sum())
        if not len(self.pool):
            raise UserError(f"pretrain.seq_len={self.seq_len} is longer than every {split} document of corpus "
                            f"{c.path}{' in ' + ', '.join(self.categories) if self.categories else ''} (a window "
                            f"needs seq_len + 1 = {self.seq_len + 1} tokens; the longest has "
                            f"{int(c.length[docs].max())}); lower pretrain.seq_len")
        self._cache: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def windows(self, key: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(documents, offsets) of the n windows of step `key` (0-based)."""
        if self._cache is not None and self._cache[:2] == (key, n):
            return self._cache[2], self._cache[3]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.stream, key])))
        docs = self.pool[rng.integers(0, len(self.pool), size=n)]
        offsets = rng.integers(0, self.corpus.length[docs] - self.seq_len)
        self._cache = (key, n, docs, offsets)
        return docs, offsets

    def tokens(self, doc: int, offset: int) -> np.ndarray:
        """The seq_len + 1 token ids of one window (int64)."""
        start = int(self.corpus.offset[doc]) + int(offset)
        return np.asarray(self.corpus.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def window_bytes(self, doc: int) -> float:
        """UTF-8 bytes the seq_len targets of a window of `doc` stand for (the document's bytes per token)."""
        return self.seq_len * float(self.corpus.nbytes[doc]) / float(self.corpus.length[doc])

    def describe(self) -> dict[str, Any]:
        """Documents and tokens of the pool per category (written to the run)."""
        c = self.corpus
        out: dict[str, dict[str, int]] = {}
        for d in self.pool.tolist():
            e = out.setdefault(c.categories[d], {"documents": 0, "tokens": 0})
            e["documents"] += 1
            e["tokens"] += int(c.length[d])
        return {"split": self.split, "documents": int(len(self.pool)), "tokens": int(c.length[self.pool].sum()),
                "dropped_short_documents": self.dropped_short, "categories": dict(sorted(out.items()))}

    def show(self, doc: int, offset: int, tokenizer: Any) -> dict[str, Any]:
        """A window as a reader wants it: document, category, offset and its text."""
        ids = self.tokens(doc, offset)
        return {"doc": int(doc), "id": self.corpus.ids[doc], "category": self.corpus.categories[doc],
                "offset": int(offset), "text": tokenizer.decode(ids.tolist())}
