"""The optimizer's state cannot be put into a bad state by value: accumulators and step counts
checked where they enter (load_state_dict, unpickling), lr tensors on a device the kernels read,
keys of other optimizers set after construction, groups appended to param_groups directly, step
counters and accumulators replaced by the user. Every refusal leaves every tensor and every
group bit for bit as it was, on every CPU backend."""
import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

from classp_fused import CLASSP, classp_step_
from classp_fused.reference import classp_step_ as reference_step_
from helpers import CPU_BACKENDS, random_like, tiny_model, train_steps
from test_optim_contract import assert_unchanged, snapshot

META_LR = torch.tensor(0.05, device="meta")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def _stepped(backend, steps=2):
    """Two groups stepped ``steps`` times (a group has its plan after one), with fresh grads."""
    model = tiny_model()
    optimizer = CLASSP([{"params": model[0].parameters()},
                        {"params": model[2].parameters(), "lr": 0.03}],
                       lr=0.05, threshold=1e-5, backend=backend)
    train_steps(model, optimizer, steps)
    model(torch.randn(3, 6)).pow(2).sum().backward()
    return model, optimizer


def _refused(optimizer, action, error, message):
    """``action`` raises ``error`` matching ``message`` and changes no tensor and no group."""
    before = snapshot(optimizer)
    with pytest.raises(error, match=message):
        action()
    assert_unchanged(optimizer, before)


# ------------------------------------------------------------------ values in a state dict
def _set(key, entry, value):
    return lambda sd: sd["state"][key].__setitem__(entry, value)


def _poke(key, index, value):
    """Accumulator ``key`` of the saved state with one element set to ``value``."""
    def edit(sd):
        sd["state"][key]["accumulator"].view(-1)[index] = value
    return edit


BAD_VALUES = {
    "negative accumulator": (_poke(2, 5, -1e-3), r"param group 1, param 0: state_dict\['state'\]"
                             r"\[2\]\['accumulator'\] has 1 of its 24 elements negative or NaN"),
    "NaN accumulator": (_poke(1, 0, float("nan")),
                        r"param group 0, param 1: state_dict\['state'\]\[1\]\['accumulator'\] "
                        r"has 1 of its 8 elements negative or NaN"),
    "-inf accumulator": (_poke(3, 2, -float("inf")),
                         r"param group 1, param 1: .*\['accumulator'\] has 1 of its 3"),
    "negative step": (_set(0, "step", torch.tensor(-1.0)),
                      r"param group 0, param 0: state_dict\['state'\]\[0\]\['step'\] must be a "
                      r"finite non-negative count, got -1.0"),
    "NaN step": (_set(1, "step", torch.tensor(float("nan"))),
                 r"param group 0, param 1: state_dict\['state'\]\[1\]\['step'\] must be a "
                 r"finite non-negative count, got nan"),
    "infinite step": (_set(1, "step", float("inf")),
                      r"param group 0, param 1: .*\['step'\] must be a finite non-negative "
                      r"count, got inf"),
    "negative int step": (_set(2, "step", torch.tensor(-3)),
                          r"param group 1, param 0: .*\['step'\] must be a finite "
                          r"non-negative count, got -3"),
    "bool step": (_set(3, "step", True),
                  r"param group 1, param 1: .*\['step'\] must be a finite non-negative count"),
    "sparse accumulator": (_set(3, "accumulator", torch.ones(3).to_sparse()),
                           r"\[3\]\['accumulator'\] must be a dense tensor"),
    "accumulator on meta": (_set(3, "accumulator", torch.ones(3, device="meta")),
                            r"param group 1, param 1: .*\['accumulator'\] is on the meta device "
                            r"and holds no values, but its param is on cpu"),
    "step on meta": (_set(0, "step", torch.zeros((), device="meta")),
                     r"param group 0, param 0: .*\['step'\] is on the meta device"),
    "lr on meta": (lambda sd: sd["param_groups"][1].update(lr=META_LR),
                   r"state_dict\['param_groups'\]\[1\]: lr is a tensor on meta; it must be on "
                   r"the CPU or on the params' device cpu"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_load_state_dict_refuses_bad_values_and_changes_nothing(backend, case):
    edit, message = BAD_VALUES[case]
    model, optimizer = _stepped(backend)
    saved = copy.deepcopy(optimizer.state_dict())
    edit(saved)
    _refused(optimizer, lambda: optimizer.load_state_dict(saved), (ValueError, TypeError,
                                                                  RuntimeError), message)
    optimizer.step()


def test_loaded_infinite_accumulator_freezes_its_elements(backend):
    """+inf is a reachable accumulator (``|g|**power`` can overflow): it loads, and the
    elements it holds take zero steps."""
    model, optimizer = _stepped(backend)
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][3]["accumulator"][0] = float("inf")
    saved["state"][3]["step"] = torch.tensor(4, dtype=torch.int64)
    optimizer.load_state_dict(saved)
    state = optimizer.state[model[2].bias]
    assert state["step"].dtype == torch.float32 and state["step"].item() == 4
    before = model[2].bias.detach().clone()
    optimizer.step()
    assert model[2].bias[0] == before[0] and not torch.equal(model[2].bias[1:], before[1:])
    assert state["accumulator"][0] == float("inf") and optimizer.state[model[2].bias][
        "step"].item() == 5


# ------------------------------------------------------------------ values in an unpickled copy
@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))],
                         ids=["deepcopy", "pickle"])
def test_a_copy_of_state_edited_to_bad_values_is_refused(backend, duplicate):
    model, optimizer = _stepped(backend)
    optimizer.state[model[0].bias]["accumulator"][3] = float("nan")  # an edit in place
    with pytest.raises(ValueError, match=r"param group 0, param 1: state\['accumulator'\] has "
                                         r"1 of its 8 elements negative or NaN"):
        duplicate(optimizer)


# ------------------------------------------------------------------ lr tensor device
def test_lr_tensor_on_another_device_is_refused_at_construction(backend):
    model = tiny_model()
    with pytest.raises(RuntimeError, match=r"param group 1: lr is a tensor on meta; it must be "
                                           r"on the CPU or on the params' device cpu"):
        CLASSP([{"params": model[0].parameters()},
                {"params": model[2].parameters(), "lr": META_LR}], lr=0.05, backend=backend)


def test_lr_tensor_on_another_device_is_refused_by_add_param_group(backend):
    model, optimizer = _stepped(backend)
    extra = torch.nn.Parameter(random_like((3,)))
    _refused(optimizer, lambda: optimizer.add_param_group({"params": [extra], "lr": META_LR}),
             RuntimeError, r"param group 2: lr is a tensor on meta")
    optimizer.step()


@pytest.mark.parametrize("steps", [0, 2], ids=["first step", "later step"])
def test_lr_tensor_assigned_on_another_device_fails_the_step_before_anything_changes(
        backend, steps):
    model, optimizer = _stepped(backend, steps)
    optimizer.param_groups[1]["lr"] = META_LR
    _refused(optimizer, optimizer.step, RuntimeError,
             r"param group 1: lr is a tensor on meta; it must be on the CPU or on the params' "
             r"device cpu")
    optimizer.param_groups[1]["lr"] = torch.tensor(0.03)
    optimizer.step()


def test_lr_tensor_follows_meta_params_until_they_are_placed():
    """Params on the meta device are placed later: an lr on meta (or elsewhere) is accepted
    with them, and the step checks it against where they went."""
    meta = torch.nn.Parameter(torch.ones(3, device="meta"))
    optimizer = CLASSP([meta], lr=META_LR, backend="torch")
    meta.grad = torch.ones(3, device="meta")
    optimizer.step()
    placed = torch.nn.Parameter(random_like((3,)))
    placed.grad = random_like((3,))
    optimizer.param_groups[0]["params"] = [placed]
    with pytest.raises(RuntimeError, match=r"param group 0: lr is a tensor on meta"):
        optimizer.step()
    assert not optimizer.state.get(placed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_bad_lr_value_on_the_gpu_is_refused_where_it_enters():
    """A CPU lr is read at every step; one on the GPU is read where its group enters."""
    model = tiny_model().cuda()
    bad = torch.tensor(-1.0, device="cuda")
    with pytest.raises(ValueError, match=r"param group 0: lr must be a finite non-negative "
                                         r"number, got -1.0"):
        CLASSP(model.parameters(), lr=bad)
    optimizer = CLASSP(model[0].parameters(), lr=torch.tensor(0.05, device="cuda"))
    model(torch.randn(4, 6, device="cuda")).pow(2).sum().backward()
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][0]["lr"] = bad
    _refused(optimizer, lambda: optimizer.load_state_dict(saved), ValueError,
             r"state_dict\['param_groups'\]\[0\]: lr must be a finite non-negative number")
    _refused(optimizer, lambda: optimizer.add_param_group({"params": model[2].parameters(),
                                                            "lr": torch.tensor(float("nan"),
                                                                               device="cuda")}),
             ValueError, r"param group 1: lr must be a finite non-negative number, got nan")


@pytest.mark.parametrize("name", ["lr", "grad_scale", "found_inf"])
def test_step_op_refuses_a_scalar_tensor_on_another_device(backend, name):
    params, grads, accs = [random_like((4, 3))], [random_like((4, 3))], [torch.rand(4, 3)]
    before = [t.clone() for t in params + accs]
    kwargs = {"lr": 0.1, name: torch.zeros((), device="meta")}
    with pytest.raises(RuntimeError, match=rf"{name} is a tensor on meta; it must be on the CPU "
                                           rf"or on the params' device cpu"):
        classp_step_(params, grads, accs, backend=backend, **kwargs)
    assert all(torch.equal(t, u) for t, u in zip(params + accs, before))


# ------------------------------------------------------------------ keys of other optimizers
@pytest.mark.parametrize("key, value", [("maximize", True), ("weight_decay", 0.01),
                                        ("momentum", 0.9), ("betas", (0.9, 0.999))])
@pytest.mark.parametrize("steps", [0, 2], ids=["first step", "later step"])
def test_keys_of_other_optimizers_set_later_fail_the_step(backend, key, value, steps):
    model, optimizer = _stepped(backend, steps)
    optimizer.param_groups[1][key] = value
    _refused(optimizer, optimizer.step, ValueError,
             rf"param group 1: {key}=.* is not supported")
    del optimizer.param_groups[1][key]
    optimizer.step()


def test_a_key_of_another_optimizer_turned_on_later_fails_the_step(backend):
    """As Hugging Face's Trainer builds groups (weight_decay=0.0), then turned on."""
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "CLASSP ignores the param group key")
        optimizer = CLASSP([{"params": model.parameters(), "weight_decay": 0.0}], lr=0.05,
                           backend=backend)
    train_steps(model, optimizer, 2)
    optimizer.param_groups[0]["weight_decay"] = 0.01
    _refused(optimizer, optimizer.step, ValueError,
             r"param group 0: weight_decay=0.01 is not supported")


def test_a_key_of_another_optimizer_set_off_later_is_ignored_with_a_warning(backend):
    model, optimizer = _stepped(backend)
    optimizer.param_groups[1]["nesterov"] = False
    with pytest.warns(UserWarning, match=r"CLASSP ignores the param group key nesterov=False "
                                         r"\(param group 1\)") as seen:
        optimizer.step()
    assert seen[0].filename == __file__
    assert optimizer.state[model[2].bias]["step"].item() == 3


# ------------------------------------------------------------------ groups appended directly
def _appended(optimizer, **group):
    """A param group with a grad appended to ``param_groups`` directly (no defaults filled)."""
    p = torch.nn.Parameter(random_like((5,)))
    p.grad = random_like((5,))
    optimizer.param_groups.append({"params": [p], **group})
    return p


@pytest.mark.parametrize("steps", [0, 2], ids=["first step", "later step"])
def test_a_group_appended_without_hyperparameters_fails_the_step_naming_them(backend, steps):
    """torch fills no defaults into a group appended to param_groups directly."""
    model, optimizer = _stepped(backend, steps)
    _appended(optimizer, lr=0.1, eps=1e-5)
    _refused(optimizer, optimizer.step, ValueError,
             r"param group 2 lacks \['threshold', 'power', 'apply_scaling', "
             r"'relative_threshold'\]: a group appended to param_groups directly gets no "
             r"defaults; add it with optimizer.add_param_group\(group\)")
    optimizer.param_groups.pop()
    optimizer.step()


def test_a_group_appended_with_one_tensor_for_params_fails_the_step(backend):
    model, optimizer = _stepped(backend)
    p = torch.nn.Parameter(random_like((3, 4)))
    p.grad = random_like((3, 4))
    optimizer.param_groups.append({**optimizer.defaults, "params": p})
    before = [t.clone() for t in (p, model[0].weight, optimizer.state[model[0].weight]["step"])]
    with pytest.raises(TypeError, match=r"param group 2: params is a tensor, not a list of "
                                        r"tensors; add the group with "
                                        r"optimizer.add_param_group\(group\)"):
        optimizer.step()
    assert all(torch.equal(t, u) for t, u in zip(
        before, (p, model[0].weight, optimizer.state[model[0].weight]["step"])))
    assert p not in optimizer.state


def test_a_group_appended_with_every_key_steps(backend):
    model, optimizer = _stepped(backend)
    p = _appended(optimizer, **optimizer.defaults)
    optimizer.step()
    assert optimizer.state[p]["step"].item() == 1


# ------------------------------------------------------------------ replaced step counters
@pytest.mark.parametrize("step", [7, 7.0, np.int64(7), torch.tensor(7), torch.tensor([7.0]),
                                  torch.tensor(7.0, dtype=torch.float64),
                                  torch.tensor(7.0, dtype=torch.bfloat16)],
                         ids=["int", "float", "numpy", "int64", "(1,)", "float64", "bfloat16"])
def test_a_step_counter_replaced_by_another_form_is_converted(backend, step):
    """Set as users of torch.optim would (``state[p]["step"] = 0`` at a task boundary), for
    every param of group 1: the step takes it as the count it holds, a 0-dim fp32 tensor from
    then on, and steps the params as the reference does."""
    model, optimizer = _stepped(backend, steps=3)
    replaced = list(model[2].parameters())
    expected = []
    for p in replaced:
        optimizer.state[p]["step"] = copy.deepcopy(step)
        param, acc = p.detach().clone(), optimizer.state[p]["accumulator"].clone()
        reference_step_([param], [p.grad], [acc], lr=0.03, threshold=1e-5, eps=1e-5,
                        power=1.0, apply_scaling=True)
        expected.append((param, acc))
    optimizer.step()
    for q in model.parameters():
        counter = optimizer.state[q]["step"]
        assert counter.dtype == torch.float32 and counter.shape == ()
        assert counter.item() == (8 if any(q is p for p in replaced) else 4)
    for p, (param, acc) in zip(replaced, expected):
        torch.testing.assert_close(p.detach(), param, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(optimizer.state[p]["accumulator"], acc, rtol=1e-6, atol=1e-7)
    train_steps(model, optimizer, 1)
    assert all(optimizer.state[p]["step"].item() == 9 for p in replaced)


BAD_STATE_EDITS = {
    "step a string": (lambda s: s.__setitem__("step", "7"), ValueError,
                      r"the step of param group 1, param 1 must be a finite non-negative count, "
                      r"got '7'"),
    "step negative": (lambda s: s.__setitem__("step", -1), ValueError,
                      r"the step of param group 1, param 1 must be a finite non-negative count"),
    "step NaN tensor": (lambda s: s.__setitem__("step", torch.tensor(float("nan"),
                                                                     dtype=torch.float64)),
                        ValueError, r"the step of param group 1, param 1 must be a finite"),
    "step of two elements": (lambda s: s.__setitem__("step", torch.ones(2)), ValueError,
                             r"the step of param group 1, param 1 must be a one-element real"),
    "step a bool tensor": (lambda s: s.__setitem__("step", torch.tensor(True)), ValueError,
                           r"the step of param group 1, param 1 must be a one-element real"),
    "step missing": (lambda s: s.pop("step"), ValueError,
                     r"the state of param group 1, param 1 must be a dict of exactly \['step', "
                     r"'accumulator'\], got \['accumulator'\]"),
    "accumulator None": (lambda s: s.__setitem__("accumulator", None), TypeError,
                         r"the accumulator of param group 1, param 1 must be a torch.float32 "
                         r"tensor"),
    "accumulator float64": (lambda s: s.__setitem__("accumulator", torch.zeros(3).double()),
                            TypeError, r"the accumulator of param group 1, param 1 must be a "
                                       r"torch.float32 tensor"),
    "accumulator sparse": (lambda s: s.__setitem__("accumulator", torch.zeros(3).to_sparse()),
                           TypeError, r"the accumulator of param group 1, param 1 must be a "
                                      r"dense tensor"),
    "accumulator expanded": (lambda s: s.__setitem__("accumulator", torch.zeros(1).expand(3)),
                             ValueError, r"the accumulator of param group 1, param 1: an "
                                         r"accumulator with internal overlap"),
    "accumulator on meta": (lambda s: s.__setitem__("accumulator", torch.zeros(3, device="meta")),
                            RuntimeError, r"the accumulator of param group 1, param 1 is on the "
                                          r"meta device and holds no values, but its param is "
                                          r"on cpu"),
    "step on meta": (lambda s: s.__setitem__("step", torch.zeros((), device="meta")),
                     RuntimeError, r"the step of param group 1, param 1 is on the meta device"),
}


@pytest.mark.parametrize("case", BAD_STATE_EDITS)
def test_a_state_entry_edited_to_a_bad_form_fails_the_step_before_anything_changes(backend,
                                                                                   case):
    edit, error, message = BAD_STATE_EDITS[case]
    model, optimizer = _stepped(backend)
    edit(optimizer.state[model[2].bias])
    _refused(optimizer, optimizer.step, error, message)


def test_a_state_entry_replaced_by_a_non_dict_fails_the_step_before_anything_changes(backend):
    model, optimizer = _stepped(backend)
    optimizer.state[model[2].bias] = None
    _refused(optimizer, optimizer.step, ValueError,
             r"the state of param group 1, param 1 must be a dict of exactly")
