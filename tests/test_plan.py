"""The step plan: which examples each process sees at each step, derived by hand for small cases."""
from ftlab.train.plan import StepPlan


def plans(n: int, batch: int, accum: int, world: int) -> list[StepPlan]:
    return [StepPlan([1] * n, batch, accum, seed=0, rank=r, world=world) for r in range(world)]


def test_every_rank_gets_grad_accum_micro_batches_even_at_an_uneven_end():
    # 9 examples, 2 processes x batch 2 = global micro-batches of 4: [4, 4, 1]; accumulation 2 -> 2 steps
    p0, p1 = plans(9, batch=2, accum=2, world=2)
    assert p0.micro_per_epoch == 3 and p0.steps_per_epoch == 2
    for step in range(2):
        a, b = p0.step_indices(step), p1.step_indices(step)
        assert len(a) == len(b) == 2  # the same number of passes on both ranks
    last0, last1 = p0.step_indices(1), p1.step_indices(1)
    assert [len(x) for x in last0] == [1, 0] and [len(x) for x in last1] == [0, 0]  # padding micro-batches
    seen = sorted(i for p in (p0, p1) for s in range(2) for mb in p.step_indices(s) for i in mb)
    assert seen == list(range(9))  # each example exactly once per epoch


def test_two_processes_see_the_global_batch_of_one_process():
    (one,) = plans(16, batch=8, accum=1, world=1)
    p0, p1 = plans(16, batch=4, accum=1, world=2)
    for step in range(2):
        assert sorted(one.step_indices(step)[0]) == sorted(p0.step_indices(step)[0] + p1.step_indices(step)[0])


def test_the_plan_is_a_function_of_seed_and_step():
    a, b = (StepPlan(list(range(1, 21)), 4, 1, seed=3, group_by_length=True) for _ in range(2))
    assert [b.step_indices(s) for s in (7, 2, 5)] == [a.step_indices(s) for s in (7, 2, 5)]  # any order
    assert a.step_indices(0) != StepPlan(list(range(1, 21)), 4, 1, seed=4).step_indices(0)


def test_a_step_sees_the_same_examples_however_it_is_split():
    """Length-grouped: batch 8 x accum 1, batch 2 x accum 4 and 2 processes x batch 2 x accum 2 pick the same 8
    examples at every step (grouping chooses a step's examples first, then cuts them into micro-batches)."""
    lengths = [(7 * i) % 23 + 1 for i in range(37)]

    def step_sets(batch: int, accum: int, world: int) -> list[set[int]]:
        ps = [StepPlan(lengths, batch, accum, seed=5, group_by_length=True, rank=r, world=world) for r in range(world)]
        return [{i for p in ps for mb in p.step_indices(s) for i in mb} for s in range(ps[0].steps_per_epoch)]

    reference = step_sets(8, 1, 1)
    assert len(reference) == 5 and sorted(i for s in reference for i in s) == list(range(37))
    assert step_sets(2, 4, 1) == reference and step_sets(2, 2, 2) == reference
    # inside a step, micro-batches are cut longest first: little padding in each
    p = StepPlan(lengths, 2, 4, seed=5, group_by_length=True)
    widths = [[lengths[i] for i in mb] for mb in p.step_indices(0)]
    flat = [w for mb in widths for w in mb]
    assert flat == sorted(flat, reverse=True)
