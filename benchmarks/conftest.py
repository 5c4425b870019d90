"""Benchmark-suite set-up: collects bench_*.py, picks the device, probes memory bandwidth.

Collected only when pytest is pointed at this folder (the default run's testpaths is tests/).
"""
import time

import pytest
import torch

from bandwidth import measure

CPU_THREADS = 2


def pytest_addoption(parser):
    parser.addoption("--bench-device", default="cuda" if torch.cuda.is_available() else "cpu",
                     choices=("cpu", "cuda"), help="device the step benchmarks run on")


def pytest_configure(config):
    config.addinivalue_line("python_files", "bench_*.py")
    if config.getoption("--bench-device") == "cpu":
        torch.set_num_threads(CPU_THREADS)
    config.classp_bandwidth = {}
    config.classp_started = time.perf_counter()


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return torch.device(pytestconfig.getoption("--bench-device"))


@pytest.fixture(scope="session")
def bandwidth(pytestconfig, device) -> dict:
    """Bandwidth probed at the start of the session (and again at its end, for the record)."""
    probes = pytestconfig.classp_bandwidth
    probes["start"] = measure(device)
    yield probes["start"]
    probes["end"] = measure(device)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Store the session's bandwidth probes and wall time beside the results."""
    output_json["classp_bandwidth"] = config.classp_bandwidth
    output_json["classp_wall_s"] = time.perf_counter() - config.classp_started


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the device the steps ran on, its name, and torch's version and thread count."""
    device = torch.device(config.getoption("--bench-device"))
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else machine_info.get("cpu", {}).get("brand_raw") or machine_info.get("processor"))
    machine_info["bench_device"] = {"type": device.type, "name": name, "torch": torch.__version__,
                                    "threads": torch.get_num_threads()}
