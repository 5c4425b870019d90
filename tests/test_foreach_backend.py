"""The foreach backend's flat layout: segment ends cached per layout, write-back through any
mix of contiguous and strided members, dtype groups returned in the caller's order."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from classp_fused import classp_step_
from classp_fused.backends.step_spec import step_spec
from classp_fused.reference import classp_step_ as reference_step_
from helpers import random_like

HYPER = dict(lr=0.05, threshold=0.02, eps=1e-5, power=1.0, apply_scaling=True)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


def _case(shapes, generator, dtypes=(torch.float32,)):
    params = [random_like(s, dtypes[i % len(dtypes)], generator) for i, s in enumerate(shapes)]
    grads = [random_like(p.shape, p.dtype, generator, scale=0.3) for p in params]
    accs = [torch.rand(p.shape, generator=generator) for p in params]
    return params, grads, accs


def _assert_steps_like_reference(params, grads, accs):
    """Step with foreach and, on clones, with the reference; returns the reference's results."""
    ref = tuple([t.clone() for t in ts] for ts in (params, grads, accs))
    counts = classp_step_(params, grads, accs, backend="foreach", **HYPER)
    assert torch.equal(counts, reference_step_(*ref, **HYPER))
    for mine, theirs in zip(params + accs, ref[0] + ref[2]):
        torch.testing.assert_close(mine, theirs, **TOLERANCE[mine.dtype])
    return ref


def test_layouts_alternating_between_steps_keep_their_own_counts():
    g = torch.Generator().manual_seed(3)
    layouts = [[(5,), (300,), (7, 11)], [(300,), (5,), (11, 7)], [(5,), (300,), (77,)],
               [(1,), (1,)]]
    for shapes in layouts + layouts[::-1]:  # the same numels in a new order, repeated layouts
        _assert_steps_like_reference(*_case(shapes, g))


def test_contiguous_and_strided_params_in_one_group_are_written_through():
    g = torch.Generator().manual_seed(4)
    base = random_like((20, 30), generator=g)
    params, grads, accs = _case([(9,), (4, 5)], g)
    params.append(base.t())  # a strided view: the whole group takes the general write-back
    grads.append(random_like((30, 20), generator=g, scale=0.3))
    accs.append(torch.rand(30, 20, generator=g))
    before = base.clone()
    ref_params, _, _ = _assert_steps_like_reference(params, grads, accs)
    assert not torch.equal(base, before)
    torch.testing.assert_close(base, ref_params[2].t(), rtol=0, atol=0)  # the storage itself


def test_interleaved_dtypes_and_empty_members_keep_their_rows():
    g = torch.Generator().manual_seed(5)
    shapes = [(13,), (0,), (6, 6), (), (40,), (0, 4), (129,)]
    _assert_steps_like_reference(*_case(shapes, g, (torch.float32, torch.bfloat16,
                                                    torch.float16)))


def test_a_step_on_fake_tensors_leaves_nothing_fake_for_real_steps_of_that_layout():
    from classp_fused.backends import foreach

    g = torch.Generator().manual_seed(6)
    shapes = [(17,), (3, 23), (101,)]
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in ts] for ts in _case(shapes, g)]
        foreach.step(*fake, step_spec(0.05, 0.02, 1e-5, 1.0, True))
    _assert_steps_like_reference(*_case(shapes, g))
