"""The compact layout (task option `compact`, the quickstart's): premises stated once by the conclusion index,
the backward plan spelled from it, short steps and short actions, all checked by the same verifier."""
import pytest

from ftlab.errors import UserError
from ftlab.sokrates import optionize, verify_trace
from ftlab.sokrates.options import ActionError, parse_action, parse_steps
from ftlab.tasks import generate_prontoqa, get_task

from test_sokrates import AUTHORS_ROW


def compact_task():
    return get_task("sokrates", source="prontoqa", backward_plan=True, compact=True)


def test_compact_prompt_and_proof_on_an_authors_row_by_hand():
    example = compact_task().to_example(AUTHORS_ROW, 0)
    prompt = example.question
    # every premise stated once, by the index alone; the sentences themselves are not repeated
    assert "\nfloral: dumpus (6, not), lorpus (9).\n" in prompt and "\nzumpus: Stella (24).\n" in prompt
    assert "(premise" not in prompt and "Stella is a zumpus" not in prompt
    assert "Claim: Stella is not floral." in prompt and "numbered from 25 on" in prompt
    lines = example.target.splitlines()
    # by hand, as the full plan (test_sokrates) but each entry spelled from its index line: rule 6 is a dead end,
    # rule 9 concludes floral, then one rule per concept back to Stella's fact 24; the first step's thought
    # spells rule 21 and derives fact 25 from fact 24
    assert lines[0] == (
        "Thought: Back from the claim: floral: each dumpus is not floral (6); dumpus: nothing. floral: each lorpus is "
        "floral (9); lorpus: each yumpus is a lorpus (2); yumpus: each rompus is a yumpus (12); rompus: each gorpus is "
        "a rompus (5); gorpus: each zumpus is a gorpus (21); zumpus: Stella is a zumpus (24). each zumpus is a gorpus "
        "(21), so Stella is a gorpus (25).")
    assert lines[1] == "Action: MODUS_PONENS [24, 21]"
    assert lines[2:4] == ["Thought: each gorpus is a rompus (5), so Stella is a rompus (26).",
                          "Action: MODUS_PONENS [25, 5]"]
    assert lines[-2:] == ["Thought: Stella is floral (29); the claim says Stella is not floral: the opposite, so the "
                          "answer is False.", "Action: CONCLUDE [29]"]
    # the same options as the full layout's proof, only written shorter
    full = optionize(example.meta["problem"], backward_plan=True)
    assert [s.action for s in parse_steps(example.target)] == [s.action for s in full.steps]
    assert verify_trace(example.meta["problem"], example.target).fully_valid
    assert len(prompt) + len(example.target) < 0.6 * (len(full.text()) + len(
        get_task("sokrates", source="prontoqa", backward_plan=True).to_example(AUTHORS_ROW, 0).question))


def test_compact_gold_proofs_verify_at_every_depth():
    task = compact_task()
    for i, record in enumerate(generate_prontoqa(50, [1, 2, 3, 4, 5], seed=17)):
        example = task.to_example(record, i)
        report = verify_trace(example.meta["problem"], example.target)
        assert report.fully_valid, (report.reasons, example.target)
        assert len(report.step_valid) == record["hops"] + 1  # one step per hop, then CONCLUDE


def test_short_actions_parse_as_the_tags_do_and_fail_with_reasons():
    assert parse_action("MODUS_PONENS [21, 1]") == parse_action('<Option type="MODUS_PONENS" args="[21, 1]" />')
    assert parse_action("CONCLUDE [23]").args == (23,)
    for text, reason in [("MODUS_PONENS [21, x]", "not a list of integers"), ("JUMP [1, 2]", "unknown option"),
                         ("MODUS_PONENS [21]", "takes 2 args"), ("MODUS_PONENS [1, 2] extra", "text after"),
                         ("modus ponens 1 2", "not an <Option")]:
        with pytest.raises(ActionError, match=reason):
            parse_action(text)


def test_a_wrong_short_step_is_invalid_with_the_verifiers_reason():
    example = compact_task().to_example(AUTHORS_ROW, 0)
    wrong = example.target.replace("Action: MODUS_PONENS [25, 5]", "Action: MODUS_PONENS [25, 21]")
    report = verify_trace(example.meta["problem"], wrong)
    assert report.step_valid[:3] == [True, False, False]  # step 3 cites the fact of the invalid step 2
    assert "does not apply" in report.reasons[1] and "invalid step" in report.reasons[2]
    assert report.answer_correct and not report.fully_valid


def test_compact_needs_the_plan():
    with pytest.raises(UserError, match="set backward_plan: true"):
        get_task("sokrates", source="prontoqa", compact=True)
    with pytest.raises(UserError, match="must be true or false"):
        get_task("sokrates", source="prontoqa", backward_plan=True, compact="yes")
