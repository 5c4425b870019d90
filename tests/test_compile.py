"""torch.compile and CLASSP: the step traces as one graph, compiled training matches eager,
and a tensor lr changed by a scheduler causes no recompilation."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from classp_fused import CLASSP, classp_step_
from helpers import CPU_BACKENDS, random_like, tiny_model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _train_step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).pow(2).mean().backward()
    optimizer.step()


def _train(step_fn, backend, steps=5):
    """Train with a tensor lr that a scheduler changes after every step."""
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=torch.tensor(0.05), threshold=1e-4, backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    inputs = torch.randn(steps, 4, 6, generator=torch.Generator().manual_seed(0))
    step_fn(model, optimizer, inputs[0])  # the first call compiles (state is created in it)
    scheduler.step()
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in inputs[1:]:
            step_fn(model, optimizer, x)
            scheduler.step()
    assert counters["stats"]["unique_graphs"] == graphs
    return model, optimizer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_traces_as_one_graph(backend):
    model = tiny_model()
    optimizer = CLASSP(model.parameters(), lr=torch.tensor(0.05), backend=backend)
    model(torch.randn(2, 6)).sum().backward()
    explanation = torch._dynamo.explain(optimizer.step)()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, \
        explanation.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compiled_training_matches_eager_without_recompiles(backend):
    eager_model, eager_opt = _train(_train_step, backend)
    compiled_model, compiled_opt = _train(torch.compile(_train_step), backend)
    assert counters["stats"]["unique_graphs"] >= 2  # the forward and the step were compiled
    for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_opt.state[q]["accumulator"],
                                   eager_opt.state[p]["accumulator"], rtol=1e-5, atol=1e-6)
        assert compiled_opt.state[q]["step"].item() == 5
    assert float(compiled_opt.param_groups[0]["lr"]) == pytest.approx(0.05 * 0.7 ** 5)
    assert compiled_opt.last_update_fraction == pytest.approx(eager_opt.last_update_fraction)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the triton backend is not available")
def test_triton_op_traces_with_fake_tensors():
    """The Triton op appears in a make_fx graph traced on FakeTensors, as torch.compile sees it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(params, grads, accs, lr):
        return classp_step_(params, grads, accs, lr=lr, threshold=1e-4, backend="triton")

    shapes = [(5, 3), (7,)]
    args = ([random_like(s) for s in shapes], [random_like(s) for s in shapes],
            [torch.zeros(s) for s in shapes], torch.tensor(0.1))
    graph = make_fx(step, tracing_mode="fake")(*args)
    assert "classp_step_triton" in graph.code
