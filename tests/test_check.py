"""The installation self-check: it passes on this machine's CPU backends, and a backend that breaks
the rule makes it exit 1, naming that backend and each failing case."""
import dataclasses
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import classp_fused
from classp_fused import check, cli
from classp_fused.backends import _module

CPU = torch.device("cpu")
BACKENDS = classp_fused.available_backends(CPU)
KERNEL = "cpp" if "cpp" in BACKENDS else "foreach"
FIRST_CASE = "float32 power=1 threshold=0 scaling=on size=1 layout=contiguous"


@pytest.fixture
def small_bandwidth_run(monkeypatch):
    """Bandwidth runs of 1e4 elements under --quick: the tests check the table, not the speed."""
    monkeypatch.setitem(check.BANDWIDTH_ELEMENTS, "cpu", 10 ** 5)


def break_backend(monkeypatch, name, breaking):
    """Replace backend ``name``'s step with ``breaking(original step)``."""
    module = _module(name)
    monkeypatch.setattr(module, "step", breaking(module.step))


def inclusive_threshold(step):
    """``step`` updating where ``g*g >= threshold``: the threshold moved to the float32 below."""
    def broken(params, grads, accs, spec):
        below = torch.nextafter(torch.tensor(spec.threshold, dtype=torch.float32),
                                torch.tensor(-math.inf))
        return step(params, grads, accs, dataclasses.replace(spec, threshold=below.item()))
    return broken


def accumulator_not_updated(step):
    def broken(params, grads, accs, spec):
        return step(params, grads, [a.clone() for a in accs], spec)
    return broken


def contiguous_copies_stepped(step):
    """``step`` on contiguous copies: a non-contiguous param or accumulator is never written."""
    def broken(params, grads, accs, spec):
        return step([p.contiguous() for p in params], grads, [a.contiguous() for a in accs],
                    spec)
    return broken


def nonfinite_gradients_leak(step):
    """``step``, then each param takes the values of its non-finite gradient elements."""
    def broken(params, grads, accs, *rest):
        counts = step(params, grads, accs, *rest)
        for p, g in zip(params, grads):
            p.copy_(torch.where(torch.isfinite(g), p, g))
        return counts
    return broken


def writes_past_the_end(step):
    """``step``, then a zero into the element after each contiguous param, where there is one."""
    def broken(params, grads, accs, *rest):
        counts = step(params, grads, accs, *rest)
        for p in params:
            end = p.storage_offset() + p.numel()
            if p.is_contiguous() and end < p.untyped_storage().nbytes() // p.element_size():
                p.as_strided((1,), (1,), end).zero_()
        return counts
    return broken


def failures_of(report):
    return {(case.call.dtype, case.call.power, case.call.threshold, case.size, case.layout): reason
            for case, reason in report.failures}


def quick_cases(keep):
    return {key for key in itertools.product(check.QUICK_DTYPES, check.POWERS, check.THRESHOLDS,
                                             check.QUICK_SIZES, check.LAYOUTS) if keep(*key)}


def table_row(out, name):
    return re.search(rf"^{name} +(\d+)/(\d+) ", out, re.MULTILINE)


def test_cli_check_passes_on_cpu(capsys, small_bandwidth_run):
    assert cli.main(["check", "--device", "cpu", "--quick"]) == 0
    out = capsys.readouterr().out
    for name in BACKENDS:
        passed, total = map(int, table_row(out, name).groups())
        assert passed == total > 0
    assert "MISMATCH" not in out
    assert out.splitlines()[-1].startswith(f"verdict: OK: {', '.join(BACKENDS)} on cpu match")


def test_default_case_set_passes():
    """Every case of the default run (float64, scaling off, empty tensors), on one backend."""
    report, = check.check_backends(["foreach"], CPU, quick=False)
    assert report.passed == report.total == (len(check.calls(False)) * len(check.SIZES)
                                             * len(check.LAYOUTS))


def test_inclusive_threshold_fails_exactly_where_gradients_sit_at_it(monkeypatch):
    break_backend(monkeypatch, "foreach", inclusive_threshold)
    reference, foreach = check.check_backends(["torch", "foreach"], CPU, quick=True)
    assert reference.passed == reference.total and not reference.failures
    # Element 1 of each tensor has a zero gradient, element 3 one exactly at the threshold.
    expected = quick_cases(lambda dtype, power, threshold, size, layout:
                           size > (3 if threshold else 1))
    failures = failures_of(foreach)
    assert set(failures) == expected
    for (_, _, threshold, _, _), reason in failures.items():
        if threshold:  # the param moves by a gradient of 0.75
            assert re.match(r"param element 3 \(grad 0.75\) changed from \S+ to \S+; it must not"
                            " be updated", reason)
        else:  # a zero gradient changes no value: the counts tell
            assert reason.startswith("counts (updated, non-finite) are")
    assert foreach.passed == foreach.total - len(expected)


def test_dropped_accumulator_update_exits_1_naming_backend_and_case(monkeypatch, capsys,
                                                                    small_bandwidth_run):
    break_backend(monkeypatch, KERNEL, accumulator_not_updated)
    assert check.main(["--device", "cpu", "--quick"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"^MISMATCH {KERNEL}: {FIRST_CASE}: accumulator element 0 \(grad \S+\) is "
                     r"\S+, expected \S+ \(error \S+ eps, tolerance 64\)$", out, re.MULTILINE)
    for name in BACKENDS:
        passed, total = map(int, table_row(out, name).groups())
        assert (passed < total) == (name == KERNEL)
    assert re.fullmatch(rf"verdict: FAIL: {KERNEL} mismatches in \d+ of \d+ cases, first: "
                        f"{FIRST_CASE}", out.splitlines()[-1])


def test_unwritten_strided_views_are_named_by_layout(monkeypatch):
    break_backend(monkeypatch, "foreach", contiguous_copies_stepped)
    report, = check.check_backends(["foreach"], CPU, quick=True)
    failures = failures_of(report)
    assert {key[-1] for key in failures} == {"strided"}
    assert quick_cases(lambda *key: key[-1] == "strided" and key[-2] >= 1023) <= set(failures)
    assert all(re.match(r"param element \d+ \(grad \S+\) is \S+, expected", reason)
               for reason in failures.values())


def test_leaked_nonfinite_gradients_are_named(monkeypatch):
    break_backend(monkeypatch, "foreach", nonfinite_gradients_leak)
    report, = check.check_backends(["foreach"], CPU, quick=True)
    failures = failures_of(report)
    assert set(failures) == quick_cases(lambda *key: key[-2] > 5)  # element 5 is NaN
    assert all(re.fullmatch(r"param element 5 \(grad nan\) changed from \S+ to nan; it must not be"
                            r" updated", reason) for reason in failures.values())


def test_writes_outside_the_view_are_named(monkeypatch):
    break_backend(monkeypatch, "foreach", writes_past_the_end)
    report, = check.check_backends(["foreach"], CPU, quick=True)
    # An offset view of n elements ends before buffer element n + 1; a one-element stride-2 view
    # is contiguous and ends before element 1; the other params end at their buffer's end.
    expected = {}
    for key in quick_cases(lambda *key: True):
        size, layout = key[-2:]
        after = {"offset": size + 1, "strided": 1 if size == 1 else None}.get(layout)
        if after is not None:
            expected[key] = f"param buffer element {after}, outside the view, changed"
    assert failures_of(report) == expected


def test_module_entry_point():
    interpreter_off = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # faster
    proc = subprocess.run([sys.executable, "-m", "classp_fused.check", "--device", "cpu",
                           "--quick"], capture_output=True, text=True, timeout=300,
                          cwd=Path(classp_fused.__file__).parents[1], env=interpreter_off)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("verdict: OK:")


def test_bad_device_is_a_usage_error(capsys):
    assert cli.main(["check", "--device", "tpu"]) == 2
    assert capsys.readouterr().err == ("classp-fused: error: argument --device: expected cpu or"
                                       " cuda[:N], got 'tpu'\n")
