"""ContinualRun, the framework-free core of the callbacks: carried optimizer state, the
penalty, consolidation data and an all-or-nothing state round trip."""
import warnings

import pytest
import torch

from classp_fused import CLASSP, EWC, MAS
from classp_fused.integrations.continual import ContinualRun, unwrap_optimizer
from classp_fused.regularizers import StiffnessWarning
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
    # the penalty's pre-hook and the recorder of the task's lrs
    assert mas.attached_to is second and len(second._optimizer_step_pre_hooks) == 2
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    second.zero_grad()
    second.step()  # no loss gradient: the step is the penalty's alone
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert unwrap_optimizer(Wrapper(Wrapper(second))) is second
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        unwrap_optimizer(Wrapper(3))


def _decaying(optimizer, factors=(0.5, 1.0, 0.5, 0.25)):
    """A warm-up and decay schedule: lr * factors[step], 0 after the last step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: factors[step] if step < len(factors) else 0.0)


def test_end_task_checks_stability_at_the_largest_lr_the_task_stepped_with():
    model = tiny_model()
    mas = MAS(model, lam=300.0)
    run = ContinualRun(mas, data=_batches(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run.begin_task(optimizer)
    train_steps(model, optimizer, steps=4, scheduler=_decaying(optimizer))
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert run.task_lrs == [0.05]  # the peak, not the mean 0.028 nor the last 0.0125
    with pytest.warns(StiffnessWarning, match="explicit penalty step is unstable") as record:
        run.end_task(optimizer)
    assert len(record) == 1
    worst = max(mas.stability_bounds(lr=0.05).values(), key=lambda b: b.stiffness)
    assert f"{worst.stiffness:.3g}" in str(record[0].message)
    assert all(b.stiffness == 0 for b in mas.stability_bounds(optimizer).values())  # at lr 0
    assert run.task_lrs is None and not optimizer._optimizer_step_pre_hooks
    second = torch.optim.SGD(model.parameters(), lr=1e-5)
    run.begin_task(second)
    train_steps(model, second, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stable at this task's lr
        run.end_task(second)


def test_end_task_without_a_step_checks_the_optimizers_lr():
    model = tiny_model()
    run = ContinualRun(MAS(model, lam=300.0), data=_batches(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    run.begin_task(optimizer)
    with pytest.warns(StiffnessWarning):
        run.end_task(optimizer)


def test_the_proximal_option_keeps_a_huge_lam_stable():
    def second_task(penalty):
        model = tiny_model()
        run = ContinualRun(MAS(model, lam=1e6), data=_batches(0), penalty=penalty)
        first = torch.optim.SGD(model.parameters(), lr=0.05)
        run.begin_task(first)
        with pytest.warns(StiffnessWarning) as record:
            run.end_task(first)
        anchor = [p.detach().clone() for p in model.parameters()]
        second = torch.optim.SGD(model.parameters(), lr=0.05)
        run.begin_task(second)
        train_steps(model, second, steps=5, seed=2)
        moved = max(float((p.detach() - a).abs().max())
                    for p, a in zip(model.parameters(), anchor))
        return run, str(record[0].message), moved

    run, message, moved = second_task("proximal")
    assert run.regularizer.penalty_form == "proximal" and "stays stable" in message
    assert moved < 1e-4  # pulled back to the anchor at every step
    run, message, moved = second_task(None)  # the regularizer's own form: explicit
    assert run.regularizer.penalty_form == "explicit" and "unstable" in message
    assert not moved < 1e3  # diverged (inf or NaN)
    proximal = MAS(tiny_model(), penalty="proximal")
    assert ContinualRun(proximal).regularizer.penalty_form == "proximal"  # None keeps it


def test_the_tasks_lrs_travel_with_the_state_and_are_checked():
    model = tiny_model()
    run = ContinualRun(EWC(model, lam=1.0), data=_batches(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    run.begin_task(optimizer)
    train_steps(model, optimizer, steps=2)
    state = run.state_dict()
    assert state["task_lrs"] == [0.3]
    restored = ContinualRun(EWC(tiny_model(), lam=1.0))
    restored.load_state_dict(state)
    assert restored.task_lrs == [0.3]
    for bad in ([float("nan")], "0.3", [-1.0], [True]):
        with pytest.raises(ValueError, match="task_lrs"):
            restored.load_state_dict({**state, "task_lrs": bad, "tasks_done": 5})
        assert restored.task_lrs == [0.3] and restored.tasks_done == 0
    earlier = {k: v for k, v in state.items() if k != "task_lrs"}
    restored.load_state_dict(earlier)
    assert restored.task_lrs is None
    restored.load_state_dict(state)
    two_groups = torch.optim.SGD([{"params": list(restored.regularizer.model.parameters())[:2]},
                                  {"params": list(restored.regularizer.model.parameters())[2:]}],
                                 lr=0.1)
    with pytest.raises(ValueError, match="1 param group"):
        restored.begin_task(two_groups)
    assert restored.regularizer.attached_to is None and not two_groups._optimizer_step_pre_hooks


@pytest.mark.parametrize("kwargs,error,match", [
    ({"regularizer": torch.nn.Linear(2, 2)}, TypeError, "regularizer must be"),
    ({"forward": 3}, TypeError, "forward must be"),
    ({"labels": 1.5}, TypeError, "labels must be"),
    ({"data": 7}, TypeError, "data must be"),
    ({"penalty": "implicit"}, ValueError, "penalty must be one of"),
    ({"penalty": "proximal"}, ValueError, "needs a regularizer"),
])
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ContinualRun(**kwargs)


def test_a_refused_penalty_leaves_the_regularizer_as_it_was():
    mas = MAS(tiny_model())
    with pytest.raises(TypeError, match="data must be"):
        ContinualRun(mas, data=7, penalty="proximal")
    assert mas.penalty_form == "explicit"
