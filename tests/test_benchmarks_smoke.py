"""The step-benchmark report generator and the bandwidth probe work (seconds; no suite run)."""
import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    report.write([path], out, tmp_path)

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


def test_bandwidth_probe_is_sane():
    result = load("bandwidth").measure("cpu", array_bytes=8 << 20, repeats=3)
    for kernel in ("copy", "triad", "update"):
        best, median = result[f"{kernel}_gbs_best"], result[f"{kernel}_gbs_median"]
        assert 0.1 < median <= best < 10_000
    assert result["array_mb"] > 8
