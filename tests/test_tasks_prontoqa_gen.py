"""The PrOntoQA generator, checked by an independent forward-chaining solver written here.

The solver shares no code with ftlab: it parses the English sentences back into rules and facts,
forward-chains to a fixpoint and decides the query. The slow tests run it over the authors' own files,
where it must agree with every label, which shows the solver itself is right.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from ftlab.tasks.prontoqa_gen import generate_prontoqa

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prontoqa"  # ../shared beside the checkout
AUTHORS_FIELDS = {"id", "question", "query", "chain_of_thought", "answer", "hops"}


# -- independent solver ---------------------------------------------------------------------------
def _singular(word: str) -> str:
    word = word.lower()
    return word[:-2] if word.endswith("uses") else word[:-1] if word.endswith("s") else word


def _is_concept_plural(word: str) -> bool:
    return word.lower().endswith("uses")  # "wumpuses"; no adjective in the vocabulary ends like this


def parse_sentence(sentence: str):
    """('isa', X, Y) | ('prop', X, P, positive) for rules; ('fact_isa', name, X) | ('fact_prop', name, P, positive)."""
    s = sentence.strip().rstrip(".")
    m = re.fullmatch(r"(?:Every|Each) (\w+) is (not )?(?:(a|an) )?(\w+)", s)
    if m:
        subject, neg, article, obj = m.groups()
        if article:
            assert not neg, sentence
            return ("isa", subject, obj)
        return ("prop", subject, obj, not neg)
    m = re.fullmatch(r"(\w+) are (not )?(\w+)", s)
    if m:
        subject, neg, obj = m.groups()
        if _is_concept_plural(obj):
            assert not neg, sentence
            return ("isa", _singular(subject), _singular(obj))
        return ("prop", _singular(subject), obj, not neg)
    m = re.fullmatch(r"([A-Z]\w*) is (not )?(?:(a|an) )?(\w+)", s)
    if m:
        name, neg, article, obj = m.groups()
        if article:
            return ("fact_isa", name, obj)
        return ("fact_prop", name, obj, not neg)
    raise AssertionError(f"solver cannot parse {sentence!r}")


def split_sentences(text: str) -> list[str]:
    return [s.strip() + "." for s in text.split(".") if s.strip()]


def statement_of(query: str) -> str:
    return re.sub(r"^.*?(true or false[:?])\s*", "", query, flags=re.IGNORECASE).strip()


def solve(context: str, query: str) -> str | None:
    """'True' / 'False' by forward chaining, None when the query is undecided."""
    isa, props, members, attrs = [], [], set(), set()
    for sentence in split_sentences(context):
        p = parse_sentence(sentence)
        if p[0] == "isa":
            isa.append(p[1:])
        elif p[0] == "prop":
            props.append(p[1:])
        elif p[0] == "fact_isa":
            members.add(p[1:])
        else:
            attrs.add(p[1:])
    changed = True
    while changed:  # fixpoint of modus ponens over both rule kinds
        changed = False
        for name, concept in list(members):
            for sub, sup in isa:
                if sub == concept and (name, sup) not in members:
                    members.add((name, sup))
                    changed = True
            for sub, prop, positive in props:
                if sub == concept and (name, prop, positive) not in attrs:
                    attrs.add((name, prop, positive))
                    changed = True
    for name, prop, positive in attrs:
        assert (name, prop, not positive) not in attrs, f"contradiction: {name} {prop}"
    kind, name, prop, positive = parse_sentence(statement_of(query))
    assert kind == "fact_prop", query
    if (name, prop, positive) in attrs:
        return "True"
    if (name, prop, not positive) in attrs:
        return "False"
    return None


# -- solver sanity on hand-made contexts ----------------------------------------------------------
def test_solver_on_hand_examples():
    ctx = "Every wumpus is a yumpus. Yumpuses are not bitter. Impuses are bitter. Sam is a wumpus."
    assert solve(ctx, "True or false: Sam is not bitter.") == "True"
    assert solve(ctx, "True or false: Sam is bitter.") == "False"
    assert solve(ctx, "True or false: Sam is hot.") is None
    assert solve("Each impus is an zumpus. Sam is an impus.", "True or false: Sam is hot.") is None


# -- generator checks -----------------------------------------------------------------------------
def test_labels_agree_with_independent_solver_over_many_seeds_and_hops():
    for seed in range(25):
        for record in generate_prontoqa(16, hops=list(range(1, 9)), seed=seed):
            assert solve(record["question"], record["query"]) == record["answer"], record


def test_labels_agree_without_distractors():
    for seed in range(10):
        for record in generate_prontoqa(6, hops=[1, 2, 4], seed=seed, distractors=False):
            assert solve(record["question"], record["query"]) == record["answer"]
            # only the proof's rules plus the single fact
            assert len(split_sentences(record["question"])) == record["hops"] + 1


def test_fields_and_chain_invariants():
    for record in generate_prontoqa(60, hops=[1, 2, 3, 4, 5, 6], seed=7):
        assert set(record) == AUTHORS_FIELDS
        assert record["query"].startswith("True or false: ")
        cot, h = record["chain_of_thought"], record["hops"]
        assert len(cot) == 2 * h + 1
        context = split_sentences(record["question"])
        # every premise the proof uses is a context sentence, verbatim
        assert cot[0] in context
        assert all(cot[k] in context for k in range(1, len(cot), 2))
        # the authors' invariant: last CoT sentence equals the query exactly when the answer is True
        assert (cot[-1] == statement_of(record["query"])) == (record["answer"] == "True")


def test_sentence_counts_match_authors_structure():
    # Authors' files: 4L + 5 sentences with chain length L in hops..5 (1-hop: 9..25, 5-hop: always 25).
    for h in (1, 3, 5):
        counts = {len(split_sentences(r["question"])) for r in generate_prontoqa(200, h, seed=h)}
        assert counts <= {4 * L + 5 for L in range(h, 6)}
        assert len(counts) == 6 - h  # every allowed length occurs


def test_deterministic_by_seed():
    a = generate_prontoqa(20, hops=[1, 3, 5], seed=11)
    assert a == generate_prontoqa(20, hops=[1, 3, 5], seed=11)
    assert a != generate_prontoqa(20, hops=[1, 3, 5], seed=12)


def test_labels_balanced_per_hop_count():
    records = generate_prontoqa(90, hops=[1, 3, 5], seed=3)
    per_hop = Counter((r["hops"], r["answer"]) for r in records)
    assert per_hop == {(h, a): 15 for h in (1, 3, 5) for a in ("True", "False")}
    # the label is not predictable from the example's position
    assert [r["answer"] for r in records[:10]] != ["True", "False"] * 5


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        generate_prontoqa(3, hops=0, seed=0)
    with pytest.raises(ValueError):
        generate_prontoqa(3, hops=[], seed=0)
    with pytest.raises(ValueError):
        generate_prontoqa(3, hops=1000, seed=0)


# -- the authors' files ---------------------------------------------------------------------------
def _authors_files() -> list[Path]:
    return sorted(DATA.glob("*.jsonl")) if DATA.is_dir() else []


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="shared PrOntoQA data not available")
def test_solver_agrees_with_authors_labels():
    files = _authors_files()
    assert len(files) == 6
    total = 0
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            assert solve(r["question"], r["query"]) == r["answer"], (path.name, r["id"])
            total += 1
    assert total == 3000  # 3 x 500 generator + 800 + 200 Coconut + 500 Logic-LM


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="shared PrOntoQA data not available")
def test_generator_statistics_close_to_authors():
    def stats(records):
        lengths = Counter(len(split_sentences(r["question"])) for r in records)
        rules = [s for r in records for s in split_sentences(r["question"]) if not re.match(r"[A-Z]\w* is ", s)
                 or s.startswith(("Every ", "Each "))]
        plural = sum(" are " in s for s in rules) / len(rules)
        concl_neg = sum(" not " in r["chain_of_thought"][-1] for r in records) / len(records)
        true_rate = sum(r["answer"] == "True" for r in records) / len(records)
        return lengths, plural, concl_neg, true_rate

    for h in (1, 3, 5):
        real = [json.loads(x) for x in (DATA / f"generator_{h}hop_test.jsonl").read_text().splitlines()]
        ours = generate_prontoqa(500, h, seed=100 + h)
        (l_real, p_real, n_real, t_real), (l_ours, p_ours, n_ours, t_ours) = stats(real), stats(ours)
        tv = 0.5 * sum(abs(l_real[k] / 500 - l_ours[k] / 500) for k in set(l_real) | set(l_ours))
        assert tv < 0.08, (h, l_real, l_ours)
        assert abs(p_real - p_ours) < 0.03
        assert abs(n_real - n_ours) < 0.08
        assert abs(t_real - t_ours) < 0.06


# -- goal-directed (backward) proof targets ---------------------------------------------------------
def test_backward_proof_by_hand():
    from ftlab.tasks.prontoqa import backward_proof

    context = ("Every shumpus is temperate. Impuses are brimpuses. Every brimpus is not temperate. "
               "Numpuses are impuses. Numpuses are rompuses. Sam is a gorpus. Sam is a numpus.")
    chain = ["Sam is a numpus.", "Numpuses are impuses.", "Sam is an impus.", "Impuses are brimpuses.",
             "Sam is a brimpus.", "Every brimpus is not temperate.", "Sam is not temperate."]
    assert backward_proof(context, "Sam is temperate.", chain, "False") == (
        "Claim: Sam is temperate. Every shumpus is temperate. Nothing says Sam is a shumpus. "
        "Every brimpus is not temperate. Impuses are brimpuses. Numpuses are impuses. Sam is a numpus. "
        "So Sam is not temperate, which contradicts the claim. The answer is False.")
    # the right property rule first in the context: no dead end is shown
    reordered = context.replace("Every shumpus is temperate. ", "") + " Each shumpus is temperate."
    assert backward_proof(reordered, "Sam is not temperate.", chain, "True").startswith(
        "Claim: Sam is not temperate. Every brimpus is not temperate. Impuses are brimpuses.")
    assert backward_proof(context, "Sam is temperate.", chain[:2], "False") is None  # not a chain


def test_closure_proof_by_hand():
    """Breadth first from the entity's facts: gorpus and numpus are expanded before what they lead to;
    property rules other than the queried one are not said; it stops at the concept whose rule says it."""
    from ftlab.tasks.prontoqa import closure_proof

    context = ("Every shumpus is temperate. Impuses are brimpuses. Every brimpus is not temperate. Gorpuses are dumpuses. "
               "Numpuses are impuses. Each numpus is opaque. Numpuses are rompuses. Brimpuses are tumpuses. "
               "Sam is a gorpus. Sam is a numpus.")
    expected = ("Sam is a gorpus. Sam is a numpus. Gorpus: dumpus. Numpus: impus, rompus. Dumpus: nothing. "
                "Impus: brimpus. Rompus: nothing. Brimpus: not temperate, tumpus. So Sam is not temperate, ")
    assert closure_proof(context, "Sam is temperate.", "False") == (
        expected + "which contradicts the claim. The answer is False.")
    assert closure_proof(context, "Sam is not temperate.", "True") == (
        expected + "which is the claim. The answer is True.")
    assert closure_proof(context, "Sam is temperate.", "True") is None  # the label disagrees with the logic
    assert closure_proof(context, "Sam is sour.", "False") is None      # nothing reachable says it


def check_backward_proof(record: dict, target: str) -> None:
    """The backward target quotes only context sentences, climbs connected rules and agrees with the solver."""
    context_sentences = set(split_sentences(record["question"]))
    body = target.split(". ")
    assert body[0].startswith("Claim: ")
    sentences = [s.rstrip(".") + "." for s in body[1:-2]]
    dead_ends = [i for i, s in enumerate(sentences) if s.startswith("Nothing says")]
    for i in dead_ends:  # a tried property rule about a concept nothing else mentions
        assert sentences[i - 1] in context_sentences and parse_sentence(sentences[i - 1])[0] == "prop"
        assert sentences[i].split()[-1].rstrip(".") == parse_sentence(sentences[i - 1])[1]
    steps = [s for i, s in enumerate(sentences) if i not in dead_ends and i + 1 not in dead_ends]
    assert all(s in context_sentences for s in steps), target
    parsed = [parse_sentence(s) for s in steps]
    assert parsed[0][0] == "prop" and parsed[-1][0] == "fact_isa"
    needed = parsed[0][1]
    for p in parsed[1:]:  # each step proves the concept the previous one needed
        if p[0] == "isa":
            assert p[2] == needed
            needed = p[1]
        else:
            assert p[2] == needed
    verdict = re.search(r"The answer is (True|False)\.$", target).group(1)
    assert verdict == record["answer"] == solve(record["question"], record["query"])


def test_backward_targets_of_generated_problems_are_valid_proofs():
    from ftlab.tasks import get_task

    task = get_task("prontoqa", proof="backward")
    records = generate_prontoqa(200, hops=[1, 2, 3, 4, 5], seed=11)
    for i, record in enumerate(records):
        check_backward_proof(record, task.to_example(record, i).target)


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/prontoqa")
def test_backward_targets_of_authors_files_are_valid_proofs():
    from ftlab.tasks import get_task

    task = get_task("prontoqa", proof="backward")
    for hops in (1, 3, 5):
        path = DATA / f"generator_{hops}hop_test.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        for i, record in enumerate(records):
            check_backward_proof(record, task.to_example(record, i).target)


@pytest.mark.parametrize("source", ["generated", "authors"])
def test_closure_targets_reach_the_queried_property_and_agree_with_the_solver(source):
    """Every problem gets a closure target (none falls back to the forward chain), each line's concept was
    reached earlier, and the verdict is the independent solver's."""
    from ftlab.tasks import get_task

    if source == "authors" and not DATA.is_dir():
        pytest.skip("needs ../shared/data/prontoqa")
    records = (generate_prontoqa(200, hops=[1, 2, 3, 4, 5], seed=12) if source == "generated" else
               [json.loads(line) for h in (1, 3, 5)
                for line in (DATA / f"generator_{h}hop_test.jsonl").read_text().splitlines()[:100]])
    task = get_task("prontoqa", proof="closure")
    for i, record in enumerate(records):
        target = task.to_example(record, i).target
        entity = record["query"].split(":")[-1].split()[0]
        reached = re.findall(rf"{entity} is an? (\w+)\.", target)
        assert reached, target
        for line in re.findall(r"(\w+): ([^.]+)\.", target):
            assert line[0].lower() in reached, target
            reached += [w for w in line[1].split(", ") if w != "nothing" and not w.startswith("not ")]
        verdict = re.search(r"The answer is (True|False)\.$", target).group(1)
        assert verdict == record["answer"] == solve(record["question"], record["query"])


def test_unknown_proof_style_is_a_user_error():
    from ftlab.errors import UserError
    from ftlab.tasks import get_task

    with pytest.raises(UserError, match="proof='sideways'"):
        get_task("prontoqa", proof="sideways")


def test_more_queries_are_provable_claims_about_the_same_world():
    """Extra claims: labels agree with the independent solver, backward targets are valid proofs,
    and asking for them does not change the main claim of the first record."""
    from ftlab.tasks import get_task

    task = get_task("prontoqa", proof="backward")
    plain = generate_prontoqa(150, hops=[1, 2, 3, 4, 5], seed=5)
    records = generate_prontoqa(150, hops=[1, 2, 3, 4, 5], seed=5, more_queries=4)
    assert {k: v for k, v in records[0].items() if k != "more_queries"} == plain[0]
    answers, n_extra = [], 0
    for i, record in enumerate(records):
        extra = record["more_queries"]
        queries = [record["query"]] + [q["query"] for q in extra]
        # at least the conclusion concept's distractor parent and the second fact's concept are available
        assert 2 <= len(extra) <= 4 and len({query_statement_prop(q) for q in queries}) == len(queries)
        example = task.to_example(record, i)
        assert len(example.followups) == len(extra)
        for q, (question, target) in zip(extra, example.followups):
            claim = {"question": record["question"], "query": q["query"], "answer": q["answer"]}
            assert question.startswith(q["query"] + "\n")  # the eval prompt's instruction follows
            check_backward_proof(claim, target)  # includes: answer == solver's label
            answers.append(q["answer"])
        n_extra += len(extra)
    assert 0.4 < answers.count("True") / n_extra < 0.6


def query_statement_prop(query: str) -> str:
    """The adjective a query asks about ('True or false: Sam is not bitter.' -> 'bitter')."""
    return query.rstrip(".").split()[-1]


def test_lookup_drills_quote_every_sentence_about_the_property():
    from ftlab.tasks import get_task

    task = get_task("prontoqa", proof="backward")
    records = generate_prontoqa(60, hops=[1, 3, 5], seed=8, lookups=3)
    for i, record in enumerate(records):
        example = task.to_example(record, i)
        assert len(example.followups) == 3
        sentences = split_sentences(record["question"])
        for prop, (question, target) in zip(record["lookups"], example.followups):
            assert question == f"Which sentences say whether something is {prop}?"
            want = [s for s in sentences if parse_sentence(s)[0] == "prop" and parse_sentence(s)[2] == prop]
            assert target == " ".join(want) and 1 <= len(want) <= 2
            # the queried property is the one with two rules (one about a concept nothing else mentions)
            assert (len(want) == 2) == (prop == statement_of(record["query"]).rstrip(".").split()[-1])
