"""A PrOntoQA-style generator (fictional ontologies, modus ponens chains, True/False queries).

Our own implementation, written to reproduce the statistics of the authors' generator output
(`asaparov/prontoqa`, `--ontology fictional --distractors relevant --ordering random`) as measured on
data/prontoqa/generator_{1,3,5}hop_test.jsonl, so that a model trained on it is tested in-distribution
on the authors' files. The measured structure of one example with `hops = h`:

* a main chain of L >= h concepts c0 < c1 < ... < c(L-1) < root ("Every c0 is a c1.", ...), where
  L is h..5 with slowly decreasing odds (1-hop: L = 1..5; 3-hop: 3..5; 5-hop: always 5);
* every chain concept has exactly one property ("Each c2 is not bitter.") and one extra "distractor
  parent" concept that itself has one property; the root has no property;
* every property adjective comes from a different family (colours, tastes, temperatures, ...); the
  conclusion's property is negated half of the time, other chain properties 28%, the distractors' 33%;
* the entity is a member of chain concept c(s), s uniform in 0..L-h, and the proof climbs h-1 subtype
  rules to c(s+h-1), whose property is the conclusion;
* a distractor rule gives the opposite property to a fresh concept that appears nowhere else;
* a distractor ontology (child < root, child with one property) and a second fact putting the entity
  in that child ("Sam is a lorpus.");
* rules in random order (half "Xs are Ys.", a quarter each "Every X is a Y." / "Each X is a Y."),
  then the two facts in random order: 4L + 5 sentences;
* query "True or false: <conclusion>." (answer True) or its negation (answer False);
* chain_of_thought: "Sam is a c(s).", then per hop the rule sentence exactly as in the context and
  the derived fact, ending with the conclusion; its last sentence equals the query iff True.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

# The concept names of the authors' fictional ontology (all 17 appear in their files).
CONCEPT_NAMES = (
    "wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus", "impus", "jompus",
    "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus", "brimpus",
)
# Our own extra made-up names, used only when a long chain needs more than 17 concepts.
EXTRA_CONCEPT_NAMES = (
    "blimpus", "crumpus", "flumpus", "glompus", "plimpus", "quompus", "skrumpus", "snorpus", "thrumpus",
    "trimpus", "whompus", "yorpus", "zimpus", "bleepus", "drimpus", "frompus", "gnarpus", "hompus",
    "klimpus", "mumpus", "norpus", "pempus", "quirpus", "ralpus", "slompus", "tarpus", "umpus",
    "welpus", "xompus", "yelpus", "zorpus", "ampus", "olpus", "erpus", "ilpus", "kempus",
)
ENTITY_NAMES = ("Fae", "Rex", "Sally", "Max", "Alex", "Sam", "Polly", "Stella", "Wren")
# Mutually exclusive adjective families (as measured: two adjectives of one family never co-occur).
PROPERTY_FAMILIES = (
    ("blue", "red", "brown", "orange"),
    ("small", "large"),
    ("metallic", "wooden", "luminous", "liquid"),
    ("transparent", "opaque"),
    ("nervous", "happy", "feisty", "shy"),
    ("bright", "dull"),
    ("sweet", "sour", "spicy", "bitter"),
    ("floral", "fruity", "earthy"),
    ("hot", "cold", "temperate"),
    ("kind", "mean", "angry", "amenable", "aggressive"),
    ("fast", "slow", "moderate"),
    ("loud", "melodic", "discordant", "muffled"),
    ("overcast", "rainy", "snowy", "sunny", "windy"),
)
# Our own extra families, only used when a chain needs more than 13 properties (hops >= 7).
EXTRA_PROPERTY_FAMILIES = (
    ("rough", "smooth"), ("wet", "dry"), ("young", "old"), ("striped", "spotted", "plain"),
    ("soft", "hard"), ("tall", "short"), ("round", "square"), ("sticky", "slippery"),
)
MAX_BASE_CHAIN = 5          # the authors' files never have a main chain longer than 5
# Measured negation rates: the conclusion 48%, other chain properties 27-28%, distractor properties 31-34%.
CONCLUSION_NEGATION = 0.5
CHAIN_NEGATION = 0.28
DISTRACTOR_NEGATION = 1 / 3
FORM_WEIGHTS = {"plural": 2, "every": 1, "each": 1}  # measured: 50% / 25% / 25%


@dataclass(frozen=True)
class _Rule:
    """'Every <subject> is <obj>' where obj is a concept, or a (possibly negated) property."""

    subject: str
    obj: str
    is_concept: bool
    negated: bool = False


def plural(noun: str) -> str:
    """wumpus -> wumpuses, impus -> impuses (all our concept names end in -us)."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def with_article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def max_supported_hops() -> int:
    """Longest chain the name/property pools can realize (2L+4 concepts, 2L+1 properties)."""
    n_names = len(CONCEPT_NAMES) + len(EXTRA_CONCEPT_NAMES)
    n_props = sum(len(f) for f in PROPERTY_FAMILIES + EXTRA_PROPERTY_FAMILIES)
    return min((n_names - 4) // 2, (n_props - 1) // 2)


def render_rule(rule: _Rule, form: str) -> str:
    """Surface form of a rule: 'Every X is a Y.', 'Each X is not P.' or 'Xs are Ys.'."""
    neg = "not " if rule.negated else ""
    if form == "plural":
        obj = plural(rule.obj) if rule.is_concept else rule.obj
        return f"{plural(rule.subject).capitalize()} are {neg}{obj}."
    obj = with_article(rule.obj) if rule.is_concept else rule.obj
    return f"{form.capitalize()} {rule.subject} is {neg}{obj}."


def _member(entity: str, concept: str) -> str:
    return f"{entity} is {with_article(concept)}."


def _attribute(entity: str, prop: str, negated: bool) -> str:
    return f"{entity} is {'not ' if negated else ''}{prop}."


def _chain_length(rng: random.Random, hops: int) -> int:
    """L in hops..max(hops, 5), weights 1, .89, .78, ... (fits the authors' 1- and 3-hop files)."""
    lengths = list(range(hops, max(hops, MAX_BASE_CHAIN) + 1))
    weights = [1 - 0.11 * k for k in range(len(lengths))]
    return rng.choices(lengths, weights=weights)[0]


def _sample_adjectives(rng: random.Random, k: int) -> list[str]:
    """k adjectives, one per family while families last, never the same adjective twice."""
    families = list(PROPERTY_FAMILIES)
    if k > len(families):
        families += list(EXTRA_PROPERTY_FAMILIES)
    chosen = [rng.choice(f) for f in rng.sample(families, min(k, len(families)))]
    if k > len(chosen):  # more properties than families: reuse families, never an adjective
        unused = [a for f in families for a in f if a not in chosen]
        chosen += rng.sample(unused, k - len(chosen))
    return chosen


def _pick_form(rng: random.Random) -> str:
    return rng.choices(list(FORM_WEIGHTS), weights=list(FORM_WEIGHTS.values()))[0]


def _generate_one(rng: random.Random, hops: int, answer: bool, distractors: bool, example_id: str,
                  more_queries: int = 0, lookups: int = 0) -> dict:
    chain_len = _chain_length(rng, hops) if distractors else hops
    start = rng.randrange(chain_len - hops + 1)
    n_concepts = 2 * chain_len + 4
    pool = list(CONCEPT_NAMES) + (list(EXTRA_CONCEPT_NAMES) if n_concepts > len(CONCEPT_NAMES) else [])
    names = rng.sample(pool, n_concepts)
    chain, root = names[:chain_len], names[chain_len]
    dparents = names[chain_len + 1: 2 * chain_len + 1]
    fresh, other_child, other_root = names[2 * chain_len + 1:]
    adjectives = _sample_adjectives(rng, 2 * chain_len + 1)
    entity = rng.choice(ENTITY_NAMES)
    end = start + hops - 1                      # the chain concept whose property is the conclusion
    negated = [rng.random() < (CONCLUSION_NEGATION if j == end else CHAIN_NEGATION) for j in range(chain_len)]
    negated += [rng.random() < DISTRACTOR_NEGATION for _ in range(chain_len + 1)]
    props = list(zip(adjectives, negated))

    subtype = [_Rule(c, chain[j + 1] if j + 1 < chain_len else root, True) for j, c in enumerate(chain)]
    chain_props = [_Rule(c, p, False, n) for c, (p, n) in zip(chain, props)]
    proof_rules = subtype[start:end] + [chain_props[end]]
    concl = chain_props[end]

    dparent_rules = [_Rule(c, d, True) for c, d in zip(chain, dparents)]
    dparent_props = [_Rule(d, p, False, n) for d, (p, n) in zip(dparents, props[chain_len:2 * chain_len])]
    other_prop = _Rule(other_child, props[-1][0], False, props[-1][1])
    if distractors:
        rules = subtype + chain_props + dparent_rules + dparent_props
        rules += [_Rule(other_child, other_root, True), other_prop]
        rules.append(_Rule(fresh, concl.obj, False, not concl.negated))  # the opposite-property distractor
        facts = [_member(entity, chain[start]), _member(entity, other_child)]
    else:
        rules = list(proof_rules)
        facts = [_member(entity, chain[start])]
    forms = {rule: _pick_form(rng) for rule in rules}
    sentences = [render_rule(rule, forms[rule]) for rule in rules]
    rng.shuffle(sentences)
    rng.shuffle(facts)

    record = {
        "id": example_id,
        "question": " ".join(sentences + facts),
        **_claim(entity, chain[start], proof_rules, forms, answer),
        "hops": hops,
    }
    if lookups:
        mentioned = sorted({r.obj for r in rules if not r.is_concept})
        record["lookups"] = rng.sample(mentioned, min(lookups, len(mentioned)))
    if more_queries and distractors:
        # Every other property the entity provably has or lacks: the other chain concepts above its
        # fact, their distractor parents, and the second fact's concept. One rule mentions each.
        others = [(chain[start], subtype[start:j] + [chain_props[j]]) for j in range(start, chain_len) if j != end]
        others += [(chain[start], subtype[start:j] + [dparent_rules[j], dparent_props[j]])
                   for j in range(start, chain_len)]
        others.append((other_child, [other_prop]))
        picked = rng.sample(others, min(more_queries, len(others)))
        record["more_queries"] = [_claim(entity, first, proof, forms, rng.random() < 0.5) for first, proof in picked]
    return record


def _claim(entity: str, first_concept: str, proof: list[_Rule], forms: dict, answer: bool) -> dict:
    """Query, answer and forward chain of thought for the property that `proof` (rules, bottom up) gives."""
    concl = proof[-1]
    cot = [_member(entity, first_concept)]
    for rule in proof[:-1]:
        cot += [render_rule(rule, forms[rule]), _member(entity, rule.obj)]
    cot += [render_rule(concl, forms[concl]), _attribute(entity, concl.obj, concl.negated)]
    query_negated = concl.negated if answer else not concl.negated
    return {"query": "True or false: " + _attribute(entity, concl.obj, query_negated),
            "chain_of_thought": cot, "answer": "True" if answer else "False"}


def generate_prontoqa(n: int, hops: int | Sequence[int], seed: int, distractors: bool = True,
                      more_queries: int = 0, lookups: int = 0) -> list[dict]:
    """`n` PrOntoQA records with the authors' fields (id, question, query, chain_of_thought, answer, hops).

    `more_queries > 0` adds a field `more_queries`: up to that many other claims about the same
    entity and context ({query, chain_of_thought, answer}, answers drawn at random), for training on
    several questions per context (the context is most of an example's tokens); only with
    distractors, which give the world its other properties. `lookups > 0` adds
    `lookups`: that many properties the context mentions, for "which sentences mention P?" drills.

    `hops` is one hop count or a list that is cycled through (example i gets hops[i % len(hops)]).
    Labels are balanced within every hop count (True/False differ by at most one) and shuffled.
    The output depends only on the arguments.
    """
    hop_list = [hops] if isinstance(hops, int) else list(hops)
    if n < 0:
        raise ValueError("n must be >= 0")
    if not hop_list or any(not isinstance(h, int) or h < 1 for h in hop_list):
        raise ValueError(f"hops must be a positive int or a non-empty list of them, got {hops!r}")
    if max(hop_list) > max_supported_hops():
        raise ValueError(f"at most {max_supported_hops()} hops are supported, got {max(hop_list)}")
    rng = random.Random(f"prontoqa-gen:{seed}")
    per_example_hops = [hop_list[i % len(hop_list)] for i in range(n)]
    answers: list[bool] = [False] * n
    for h in sorted(set(per_example_hops)):
        idx = [i for i, x in enumerate(per_example_hops) if x == h]
        labels = [k % 2 == 0 for k in range(len(idx))]
        rng.shuffle(labels)
        for i, label in zip(idx, labels):
            answers[i] = label
    return [
        _generate_one(rng, h, answers[i], distractors, f"prontoqa-gen-s{seed}-{i:06d}", more_queries, lookups)
        for i, h in enumerate(per_example_hops)
    ]
