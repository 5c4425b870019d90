"""The step-benchmark report generator, the bandwidth probe and the GPU suite's planning,
measurement loop and report work (seconds; the GPU suite runs on the CPU, without kernel and
graph times)."""
import importlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def benchmark(impl, size, tensors, median, baseline, dtype="fp32", power=1.0, threshold=0.0,
              peak_mb=0.0):
    classp = impl.startswith("classp")
    nbytes = {"fp32": 20, "bf16": 14}[dtype]
    gbs = nbytes * size / median / 1e9
    return {"name": f"test_step[{impl}-{size}]", "stats": {"median": median, "rounds": 9},
            "extra_info": dict(impl=impl, size=size, tensors=tensors, dtype=dtype,
                               power=power if classp else None,
                               threshold=threshold if classp else None,
                               bytes_per_element=nbytes, first_call_s=20.0,
                               peak_extra_mb=peak_mb, gbs=gbs, bandwidth_gbs=50.0,
                               bandwidth_fraction=gbs / 50.0, baseline_median_s=baseline,
                               ratio_to_baseline=median / baseline)}


def test_report_from_synthetic_json(tmp_path):
    report = load("report")
    probe = {"device": "cpu", "array_mb": 1073.7, "repeats": 10, "threads": 2,
             "copy_gbs_best": 35.0, "copy_gbs_median": 34.0, "triad_gbs_best": 38.0,
             "triad_gbs_median": 37.0, "update_gbs_best": 50.0, "update_gbs_median": 48.0}
    data = {
        "machine_info": {"bench_device": {"type": "cpu", "name": "Test CPU", "torch": "2.13.0",
                                          "threads": 2}},
        "datetime": "2026-11-24T10:00:00.000000+00:00",
        "classp_bandwidth": {"start": probe, "end": probe},
        "classp_wall_s": 300.0,
        "benchmarks": [
            benchmark("adagrad/fused", 10**7, 1, 4e-3, 4e-3),
            benchmark("classp/cpp", 10**7, 1, 3.2e-3, 4e-3),
            benchmark("classp/torch", 10**7, 1, 0.16, 4e-3, peak_mb=400.0),
            benchmark("classp/torch+compile", 10**7, 1, 4.4e-3, 4e-3),
            benchmark("adagrad/fused", 10**6, 1, 4e-4, 4e-4),
            benchmark("classp/cpp", 10**6, 1, 3e-4, 4e-4),
            benchmark("adagrad/fused", 10**7, 200, 6e-3, 6e-3),
            benchmark("classp/cpp", 10**7, 200, 3e-3, 6e-3),
            benchmark("classp/cpp", 10**7, 1, 2.5e-3, 3e-3, dtype="bf16"),
            benchmark("classp/cpp", 10**7, 1, 3e-3, 4e-3, threshold=2.7),
        ],
    }
    path = tmp_path / "step_cpu.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    report.write([path], out, tmp_path, bounded_json=tmp_path / "absent.json",
                 density_json=tmp_path / "absent.json")

    text = out.read_text()
    assert "## CPU" in text and "## GPU" in text
    assert "| device | torch | size | layout |" in text
    assert "`classp/cpp` vs fused Adagrad, 1e7, 1 tensor: **0.80x**" in text
    assert "`classp/cpp` vs fused Adagrad, 1e7, 200 tensors: **0.50x**" in text
    assert "`classp/cpp` vs the eager reference, 1e7, 1 tensor: **50.0x** faster" in text
    assert "first call (compile included) 20.0 s" in text
    assert "in-place update `a += s*b`" in text and "update 50.0 (median 48.0)" in text
    assert "| CLASSP (fp32 accumulator) | 20 | 14 |" in text
    assert text.count("| cpu | 2.13.0 |") == len(data["benchmarks"])
    assert (tmp_path / "step_bandwidth_cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_bounded_memory_section_from_synthetic_json(tmp_path):
    report, bounded_report = load("report"), load("bounded_report")
    assert bounded_report.section(tmp_path / "absent.json") == []

    def case(name, tensors, threads, median, peer, load_average):
        info = dict(case=name, tensors=tensors, size=10**7, threads=threads, rounds=15,
                    load_average=load_average, median_s=median, peer_median_s=peer,
                    ratio_median=median / peer, ratio_min=0.5 * median / peer,
                    ratio_max=2 * median / peer, peak_extra_mb=1.2, peak_extra_fraction=0.03)
        return {"name": f"test_bounded_memory[{name}]", "extra_info": info}
    data = {"machine_info": {"bench_device": {"type": "cpu", "name": "Test CPU",
                                              "torch": "2.13.0", "threads": 2}},
            "datetime": "2026-12-05T10:00:00.000000+00:00",
            "benchmarks": [case("foreach-step", 1, 2, 12e-3, 4e-3, 5.5),
                           case("proximal_step_", 200, 1, 9e-3, 3e-3, 3.25)]}
    bounded = tmp_path / "bounded_memory_cpu.json"
    bounded.write_text(json.dumps(data))
    step = tmp_path / "step_cpu.json"
    step.write_text(json.dumps({
        "machine_info": data["machine_info"], "datetime": data["datetime"],
        "classp_bandwidth": {}, "classp_wall_s": 60.0,
        "benchmarks": [benchmark("adagrad/fused", 10**7, 1, 4e-3, 4e-3)]}))
    out = tmp_path / "RESULTS.md"
    report.write([step], out, tmp_path, bounded_json=bounded,
                 density_json=tmp_path / "absent.json")
    text = out.read_text()
    assert "### Bounded temporaries (CPU, pure-PyTorch paths)" in text
    assert "load average 3.2 to 5.5" in text
    assert ('| `CLASSP(backend="foreach").step()` | fused Adagrad | 1 tensor | 2 | 12 ms | 4 ms '
            '| **3.00x** (1.50-6.00) | 1.20 MB (3.0%) |') in text
    assert "| `proximal_step_` | `torch._foreach_add_` | 200 tensors | 1 |" in text
    assert text.index("Bounded temporaries") < text.index("## How to read the tables")


def test_density_gradients_select_exactly_the_share_asked():
    cases = load("density_cases")
    generator = torch.Generator().manual_seed(0)
    for case in (cases.DensityCase(0.01, "random"), cases.DensityCase(0.001, "clustered")):
        grad = cases.gradient(case, generator)
        selected = grad * grad > cases.THRESHOLD
        assert int(selected.sum()) == case.selected
        assert grad.abs().max() < 2.5 and grad[~selected].abs().max() < 0.9
        if case.mask == "clustered":  # whole rows, none partly
            assert set(selected.view(-1, cases.ROW).sum(1).unique().tolist()) == {0, cases.ROW}


def test_density_section_from_synthetic_json(tmp_path):
    report, density_report = load("report"), load("density_report")
    absent = "\n".join(density_report.section(tmp_path / "absent.json"))
    assert "Not measured yet" in absent and "classp_cuda.cu" in absent

    def samples(dense, none, one_percent):
        return {"dense": [dense, 2 * dense], "none selected": [none, none],
                "random 1.0%": [one_percent, 3 * one_percent], "read-only floor": [none, none]}
    builds = [{"label": "before (old)", "samples": samples(4e-3, 2e-3, 4e-3)},
              {"label": "after (new)", "samples": samples(3e-3, 2e-3, 2e-3)}]
    data = {"datetime": "2026-12-05T12:00:00+00:00",
            "machine": {"cpu": "Test CPU", "cores": 2, "torch": "2.13.0"}, "wall_s": 90.0,
            "load": {"start": "12:00 load average: 1.00, 2.00, 3.00",
                     "end": "12:01 load average: 1.50, 2.00, 3.00", "one_minute": [1.0, 1.5]},
            "cases": [{"name": "dense", "density": 1.0, "mask": "random", "selected": 10**7},
                      {"name": "none selected", "density": 0.0, "mask": "random",
                       "selected": 0},
                      {"name": "random 1.0%", "density": 0.01, "mask": "random",
                       "selected": 10**5}],
            "runs": [{"threads": 2, "clock": "wall time", "rounds": 2, "builds": builds},
                     {"threads": 1, "clock": "thread CPU time", "rounds": 2,
                      "builds": builds[1:]}]}
    path = tmp_path / "density_cpu.json"
    path.write_text(json.dumps(data))
    step = tmp_path / "step_cpu.json"
    step.write_text(json.dumps({
        "machine_info": {"bench_device": {"type": "cpu", "name": "Test CPU", "torch": "2.13.0",
                                          "threads": 2}},
        "datetime": data["datetime"], "classp_bandwidth": {}, "classp_wall_s": 60.0,
        "benchmarks": [benchmark("adagrad/fused", 10**7, 1, 4e-3, 4e-3)]}))
    out = tmp_path / "RESULTS.md"
    report.write([step], out, tmp_path, bounded_json=tmp_path / "absent.json",
                 density_json=path)
    text = out.read_text()
    assert "### Step cost against update density (CPU)" in text
    assert "`12:00 load average: 1.00, 2.00, 3.00` at the start" in text
    assert "1-minute load average 1.00 to 1.50" in text
    # per-round ratios to dense: before 4/4, 12/8; after 2/3, 6/6
    assert ("| random 1.0% | 100,000 | 4 ms | 1.00 (1.25) | 2.00 | 2 ms | 0.67 (0.83) | 1.00 "
            "| 0.50 |") in text
    assert "| read-only floor | - |" in text
    assert "- after (new), random 1%: **1.00x** the empty selection's step, **0.67x**" in text
    assert "dense step, after (new) over before (old): **0.75x**" in text
    assert "**2 threads, wall time, 2 rounds.**" in text
    assert "**1 thread, thread CPU time, 2 rounds.**" in text
    assert "| random 1.0% | 100,000 | 2 ms | 0.67 (0.83) | 1.00 |\n" in text  # one build
    assert text.index("update density") < text.index("## How to read the tables")


def test_bandwidth_probe_writes_every_kernel():
    """What the probe reports, not how fast the machine is: every kernel's best and median,
    finite and positive, the array size and the settings it ran with."""
    result = load("bandwidth").measure("cpu", array_bytes=8 << 20, repeats=3)
    rates = {f"{kernel}_gbs_{stat}" for kernel in ("copy", "triad", "update")
             for stat in ("best", "median")}
    assert set(result) == {"device", "array_mb", "repeats", "threads"} | rates
    assert (result["device"], result["repeats"]) == ("cpu", 3)
    assert result["threads"] == torch.get_num_threads()
    assert result["array_mb"] == (8 << 20) / 1e6
    assert all(math.isfinite(result[key]) and result[key] > 0 for key in rates)


def test_gpu_plan_pairs_every_group_with_peers_that_exist_on_cuda():
    gpu = load("gpu")
    groups = gpu.plan(["cuda", "triton"], gpu.GPU_GROUPS)
    cases = [case for group in groups for case in group]
    assert {c.impl for c in cases} == {"classp/cuda", "classp/triton", "classp/naive+compile",
                                       "adam/fused", "adagrad/foreach", "adagrad/compiled"}
    assert "adagrad/fused" not in {c.impl for c in cases}  # torch has it on the CPU only
    for group in groups:
        assert len({case.layout for case in group}) == 1
        assert any(c.impl == gpu.BASELINE for c in group)
        assert any(c.impl.startswith("classp/") for c in group)
        assert sum(gpu.memory_bytes(c) for c in group) < 0.8 * 139 * 2**30  # an H200's memory
    layouts = {(c.size, c.tensors, c.dtype, c.power, c.threshold) for c in cases
               if c.impl == "classp/cuda"}
    assert {(10**8, 1, "fp32", 1.0, 0.0), (10**9, 1, "fp32", 1.0, 0.0),
            (10**8, 200, "fp32", 1.0, 0.0), (10**8, 1, "bf16", 1.0, 0.0),
            (10**8, 1, "fp32", 2.0, 0.0), (10**8, 1, "fp32", 0.5, 0.0)} <= layouts
    compiles = [c for c in cases if c.impl in gpu.COMPILED]
    assert len(compiles) <= 10  # each costs seconds to tens of seconds on the GPU machine


def test_gpu_suite_measures_and_reports_on_the_cpu(tmp_path):
    gpu, gpu_report = load("gpu"), load("gpu_report")
    group = [gpu.Case("classp/cpp", 3000, 5, power=1.0, threshold=0.0),
             gpu.Case("classp/foreach", 3000, 5, power=1.0, threshold=0.0),
             gpu.Case("adam/fused", 3000, 5), gpu.Case("adagrad/foreach", 3000, 5)]
    results = gpu.run("cpu", groups=[group, [gpu.Case("classp/cpp", 10, 1, "bf16", 2.0, 0.0)]],
                      rounds=2, round_budget_s=1e-3, probe_bytes=1 << 20)
    assert [r["impl"] for r in results["rows"]] == [c.impl for c in group] + ["classp/cpp"]
    for row in results["rows"]:
        assert row["error"] is None and len(row["eager_s_rounds"]) == 2
        assert row["eager_s"] > 0 and row["host_s"] > 0
        assert row["kernel_s"] is None and row["graph_s"] is None  # CUDA only
    path = tmp_path / "gpu_step_cuda.json"
    path.write_text(json.dumps(results))
    text = "\n".join(gpu_report.section(path))
    assert "| 3e3 | 5 | fp32 | 1 | 0 | `classp/cpp` | - |" in text
    assert "Not yet measured" not in text


def test_gpu_report_from_synthetic_results(tmp_path):
    gpu_report = load("gpu_report")
    assert "**Not yet measured.**" in "\n".join(gpu_report.section(tmp_path / "absent.json"))

    def row(impl, kernel, host, graph=1e-4, error=None):
        classp = impl.startswith("classp")
        return dict(impl=impl, size=10**8, tensors=1, dtype="fp32",
                    power=1.0 if classp else None, threshold=0.0 if classp else None,
                    bytes_per_element=32 if impl == "adam/fused" else 20, first_call_s=1.0,
                    kernel_s=kernel, eager_s=2 * kernel, graph_s=None if error else graph,
                    host_s=host, graph_error=error, error=None, kernel_s_rounds=[kernel],
                    eager_s_rounds=[2 * kernel, 2.02 * kernel],
                    graph_s_rounds=[], host_s_rounds=[])
    run = {"device": {"type": "cuda", "name": "Test GPU", "torch": "2.11.0", "cuda": "13.0"},
           "datetime": "2026-11-30 03:00 UTC", "wall_s": 180.0, "skipped": ["a-1e9 (memory)"],
           "bandwidth": {"copy_gbs_best": 4000.0, "update_gbs_best": 4000.0, "repeats": 10,
                         "array_mb": 2000.0},
           "rows": [row("classp/cuda", 5e-4, 20e-6), row("adagrad/compiled", 4e-4, 100e-6),
                    row("adam/fused", 8e-4, 40e-6, error="RuntimeError: capture failed")]}
    path = tmp_path / "gpu_step_cuda.json"
    path.write_text(json.dumps(run))
    text = "\n".join(gpu_report.section(path))
    assert "### GPU (Test GPU)" in text and "copy 4000 GB/s" in text
    # 20 B x 1e8 / 500 us = 4000 GB/s: 100% of both; 1.25x compiled Adagrad; 0.50x fused Adam
    assert ("| 1e8 | 1 | fp32 | 1 | 0 | `classp/cuda` | 500 µs | 4000 | 100% | 100% | 1 ms | "
            "100 µs | 20 µs | 1.25 | 0.50 |") in text
    assert "| fails |" in text and "RuntimeError: capture failed" in text
    assert "a-1e9 (memory)" in text and "maximum 1.010" in text
