"""The CUDA kernel and its op registration compile for sm_90 (compile only: no GPU needed).

Plain ``nvcc -c`` against the installed torch's headers, with the flags torch's extension builder
adds; skipped where nvcc is not installed."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/classp_cuda.cu", "csrc/classp_cuda_op.cpp"]


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else shutil.which("nvcc")


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def nvcc_command(source, output):
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    return [NVCC, "-c", str(ROOT / source), "-o", str(output), "-std=c++20", "-O3",
            "-gencode", "arch=compute_90,code=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS, *includes]


def test_cuda_sources_compile_for_sm90(tmp_path):
    jobs = []
    for source in SOURCES:  # in parallel: the op file parses torch's heavier headers
        output = tmp_path / (Path(source).name + ".o")
        jobs.append((source, output, subprocess.Popen(
            nvcc_command(source, output), cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)))
    for source, output, job in jobs:
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"nvcc failed on {source}:\n{log}"
        assert output.stat().st_size > 0
        own_warnings = [line for line in log.splitlines()
                        if "warning" in line and "csrc/" in line]
        assert not own_warnings, "\n".join(own_warnings)

    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(tmp_path / "classp_cuda.cu.o")],
                                 capture_output=True, text=True, check=True).stdout
        assert "sm_90" in listing
