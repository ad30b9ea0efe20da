"""Random windows of a prepared corpus: a function of (seed, step), short documents dropped and counted,
K categories chosen by seed (nested in K), and the plan that splits a step's windows across processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ftlab.data.corpus import Corpus
from ftlab.data.windows import WindowSampler, choose_categories, eligible_categories
from ftlab.errors import UserError
from tests.pretrain_helpers import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# -- windows ---------------------------------------------------------------------------------------------------
def test_windows_are_a_function_of_seed_and_step(corpus):
    c = Corpus.open(corpus)
    a = WindowSampler(c, "train", None, 16, seed=3)
    b = WindowSampler(Corpus.open(corpus), "train", None, 16, seed=3)
    for step in (0, 7, 1000):
        da, oa = a.windows(step, 12)
        db, ob = b.windows(step, 12)
        assert da.tolist() == db.tolist() and oa.tolist() == ob.tolist()
    assert a.windows(1, 12)[0].tolist() != a.windows(2, 12)[0].tolist()
    assert WindowSampler(c, "train", None, 16, seed=4).windows(0, 12)[1].tolist() != a.windows(0, 12)[1].tolist()
    docs, offsets = a.windows(5, 200)
    assert set(docs.tolist()) <= set(c.splits["train"].tolist())
    for d, o in zip(docs.tolist(), offsets.tolist()):  # inside the document, seq_len + 1 tokens, from tokens.bin
        assert 0 <= o and o + 17 <= c.length[d]
        assert a.tokens(d, o).tolist() == c.doc_tokens(d)[o:o + 17].tolist()


def test_short_documents_are_dropped_and_counted(corpus):
    c = Corpus.open(corpus)
    seq = int(np.median(c.length[c.splits["train"]]))
    s = WindowSampler(c, "train", None, seq, seed=0)
    short = int((c.length[c.splits["train"]] < seq + 1).sum())
    assert s.dropped_short == short > 0 and len(s.pool) == len(c.splits["train"]) - short
    with pytest.raises(UserError, match="is longer than every train document"):
        WindowSampler(c, "train", None, int(c.length.max()), seed=0)
    with pytest.raises(UserError, match=r"no train documents of categories \['nope'\]"):
        WindowSampler(c, "train", ["nope"], 16, seed=0)


def test_categories_are_chosen_by_seed_and_nested_in_k(corpus):
    c = Corpus.open(corpus)
    assert eligible_categories(c, "train", 16) == ["astro", "bio", "math"]
    for seed in range(5):
        one, two, three = (choose_categories(c, k, seed, "train", 16) for k in (1, 2, 3))
        assert two[:1] == one and three[:2] == two and sorted(three) == ["astro", "bio", "math"]
        assert choose_categories(c, 2, seed, "train", 16) == two
    assert len({tuple(choose_categories(c, 1, s, "train", 16)) for s in range(20)}) == 3
    with pytest.raises(UserError, match="pretrain.num_categories=4, but only 3 categories"):
        choose_categories(c, 4, 0, "train", 16)


def test_two_processes_share_exactly_the_windows_of_one():
    from ftlab.train.pretrain import WindowPlan

    one = WindowPlan(4, 2, 0, 1, 100)
    two = [WindowPlan(2, 2, r, 2, 100) for r in (0, 1)]
    for step in range(3):
        for m in range(2):
            assert sorted(two[0].step_indices(step)[m] + two[1].step_indices(step)[m]) == one.step_indices(step)[m]
    assert one.step_indices(1) == [[8, 9, 10, 11], [12, 13, 14, 15]]
