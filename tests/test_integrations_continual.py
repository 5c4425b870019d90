"""ContinualRun, the framework-free core of the callbacks: carried optimizer state, the
penalty, consolidation data and an all-or-nothing state round trip."""
import pytest
import torch

from classp_fused import CLASSP, EWC, MAS
from classp_fused.integrations.continual import ContinualRun, unwrap_optimizer
from helpers import tiny_model, train_steps


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g))]


def test_new_optimizer_continues_from_the_carried_state_with_its_own_groups():
    model = tiny_model()
    run = ContinualRun(MAS(model), data=lambda task: _batches(task))
    first = CLASSP(model.parameters(), lr=0.05)
    run.begin_task(first)
    train_steps(model, first, steps=3)
    run.end_task(first)
    second = CLASSP(model.parameters(), lr=0.01)
    run.begin_task(second)
    for p in model.parameters():
        assert torch.equal(second.state[p]["accumulator"], first.state[p]["accumulator"])
        assert second.state[p]["accumulator"] is not first.state[p]["accumulator"]
    assert second.param_groups[0]["lr"] == 0.01
    assert run.tasks_done == 1 and run.regularizer.tasks_seen == 1


def test_an_optimizer_with_state_and_carry_off_are_left_alone():
    model = tiny_model()
    run = ContinualRun(carry_optimizer_state=False)
    optimizer = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, optimizer, steps=1)
    run.end_task(optimizer)
    fresh = CLASSP(model.parameters(), lr=0.05)
    run.begin_task(fresh)
    assert not fresh.state
    run = ContinualRun()
    run.end_task(optimizer)
    other = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, other, steps=1)
    before = {p: other.state[p]["accumulator"].clone() for p in model.parameters()}
    run.begin_task(other)
    assert all(torch.equal(other.state[p]["accumulator"], a) for p, a in before.items())


def test_carried_state_for_other_parameters_raises():
    model = tiny_model()
    run = ContinualRun()
    optimizer = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, optimizer, steps=1)
    run.end_task(optimizer)
    smaller = CLASSP(list(model.parameters())[:2], lr=0.05)
    with pytest.raises(ValueError, match="other parameters"):
        run.begin_task(smaller)
    assert not smaller.state


def test_end_task_without_data_raises_before_counting_the_task():
    model = tiny_model()
    run = ContinualRun(MAS(model))
    with pytest.raises(ValueError, match="no consolidation data"):
        run.end_task(CLASSP(model.parameters(), lr=0.05))
    assert run.tasks_done == 0


def test_state_round_trip_and_all_or_nothing_load():
    model = tiny_model()
    run = ContinualRun(EWC(model, lam=1.0), data=_batches(0))
    optimizer = CLASSP(model.parameters(), lr=0.05)
    train_steps(model, optimizer, steps=2)
    run.end_task(optimizer)
    state = run.state_dict()
    restored = ContinualRun(EWC(tiny_model(), lam=1.0))
    restored.load_state_dict(state)
    assert restored.tasks_done == 1
    assert all(torch.equal(restored.regularizer.importance[n], t)
               for n, t in run.regularizer.importance.items())
    bad = ContinualRun(MAS(tiny_model()))
    with pytest.raises(ValueError, match="not MAS"):
        bad.load_state_dict(state)
    assert bad.tasks_done == 0 and bad.regularizer.tasks_seen == 0
    with pytest.raises(ValueError, match="lacks"):
        bad.load_state_dict({"tasks_done": 1})


def test_the_regularizer_is_attached_to_each_tasks_optimizer_through_wrappers():
    model = tiny_model()
    mas = MAS(model)
    run = ContinualRun(mas, data=_batches(1))

    class Wrapper:  # accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    first = CLASSP(model.parameters(), lr=0.05)
    run.begin_task(Wrapper(first))
    assert mas.attached_to is first and first._penalty_source is mas
    run.begin_task(first)  # again: stays attached
    run.end_task(Wrapper(first))
    assert mas.attached_to is None and first._penalty_source is None
    second = torch.optim.SGD(model.parameters(), lr=0.05)
    run.begin_task(Wrapper(Wrapper(second)))
    assert mas.attached_to is second and len(second._optimizer_step_pre_hooks) == 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    second.zero_grad()
    second.step()  # no loss gradient: the step is the penalty's alone
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert unwrap_optimizer(Wrapper(Wrapper(second))) is second
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        unwrap_optimizer(Wrapper(3))


@pytest.mark.parametrize("kwargs,match", [
    ({"regularizer": torch.nn.Linear(2, 2)}, "regularizer must be"),
    ({"forward": 3}, "forward must be"),
    ({"labels": 1.5}, "labels must be"),
    ({"data": 7}, "data must be"),
])
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(TypeError, match=match):
        ContinualRun(**kwargs)
