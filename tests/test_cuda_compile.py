"""The CUDA kernel and its op registration compile for sm_90 (compile only: no GPU needed), and
the kernel's code has the memory accesses it is designed around.

Plain ``nvcc`` against the installed torch's headers, with the flags torch's extension builder
adds; skipped where nvcc is not installed. The machine code (SASS) is inspected with cuobjdump:
beside nvcc, on PATH, or from NVIDIA's ``nvidia-cuda-cuobjdump`` wheel (in the test extra)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "csrc/classp_cuda.cu"
SOURCES = [KERNEL, "csrc/classp_cuda_op.cpp"]
# Per param dtype, accumulator formats x power paths 1, 2, generic x (penalty none, or explicit
# and proximal with each importance format: the param's dtype, bfloat16 (of float and half
# params), 8-bit codes (but of double params)): float and half, bfloat16, double (exact
# accumulators only)
CODE_VARIANTS = (2 * (1 + 2 * 3) + (1 + 2 * 2)) * 3  # with 8-bit accumulator codes
VARIANTS = 3 * CODE_VARIANTS + (1 + 2 * 1) * 3
# bytes of an element, by the mangled name of its param type and of its importance format
PARAM_BYTES = {"IfL": 4, "IdL": 8, "IN3c104HalfE": 2, "IN3c108BFloat16E": 2}
IMPORTANCE_BYTES = {"ImportanceFormatE1E": 2, "ImportanceFormatE2E": 1}


def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else shutil.which("nvcc")


def find_cuobjdump():
    """cuobjdump beside nvcc, on PATH, or in the ``nvidia-cuda-cuobjdump`` wheel."""
    candidates = [Path(NVCC).with_name("cuobjdump")] if NVCC else []
    on_path = shutil.which("cuobjdump")
    candidates += [Path(on_path)] if on_path else []
    try:
        import nvidia.cu13
        candidates += [Path(path) / "bin" / "cuobjdump" for path in nvidia.cu13.__path__]
    except ImportError:
        pass
    return next((str(path) for path in candidates if path.is_file()), None)


def run_cuobjdump(*args: str) -> str:
    """cuobjdump's listing; it finds nvdisasm (needed for SASS) beside itself or on PATH."""
    path = os.pathsep.join([str(Path(CUOBJDUMP).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path}
    return subprocess.run([CUOBJDUMP, *args], capture_output=True, text=True, check=True,
                          env=env).stdout


NVCC = find_nvcc()
CUOBJDUMP = find_cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def nvcc_command(source, output, *extra):
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    return [NVCC, "-c", str(ROOT / source), "-o", str(output), "-std=c++20", "-O3",
            "-gencode", "arch=compute_90,code=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS, *includes, *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Objects of both sources, compiled in parallel, and the kernel's PTX (kept from its
    compilation)."""
    out = tmp_path_factory.mktemp("nvcc")
    outputs = {source: out / (Path(source).name + ".o") for source in SOURCES}
    keep = out / "intermediate"
    keep.mkdir()
    jobs = {source: subprocess.Popen(
                nvcc_command(source, output, *(["-keep", f"-keep-dir={keep}"]
                                               if source == KERNEL else [])),
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for source, output in outputs.items()}
    logs = {source: (job.communicate(timeout=600)[0], job.returncode)
            for source, job in jobs.items()}
    outputs["ptx"] = next(keep.glob("*.ptx"), None)
    return outputs, logs


def test_cuda_sources_compile_for_sm90(built):
    outputs, logs = built
    for source in SOURCES:
        log, returncode = logs[source]
        assert returncode == 0, f"nvcc failed on {source}:\n{log}"
        assert outputs[source].stat().st_size > 0
        own_warnings = [line for line in log.splitlines()
                        if "warning" in line and "csrc/" in line]
        assert not own_warnings, "\n".join(own_warnings)
    if CUOBJDUMP:
        listing = run_cuobjdump("--list-elf", str(outputs[KERNEL]))
        assert "sm_90" in listing


def step_kernels(code: str, entry: str) -> dict[str, str]:
    """The text of each step kernel, by mangled name, in PTX or SASS listing ``code``."""
    starts = [m for m in re.finditer(entry, code)]
    bodies = {}
    for m, after in zip(starts, starts[1:] + [None]):
        if "classp_step_kernel" in m.group(1):
            bodies[m.group(1)] = code[m.start():after.start() if after else len(code)]
    return bodies


def streamed_bytes(body: str) -> int:
    """The bytes the streaming (evict-first) loads of a kernel's PTX read, summed over the
    instructions."""
    widths = {"v4.u32": 16, "v2.u32": 8, "u32": 4}
    return sum(widths[w] for w in re.findall(r"ld\.global\.cs\.(v4\.u32|v2\.u32|u32)\b", body))


def element_bytes(name: str) -> tuple[int, int]:
    """The bytes of a kernel variant's param and importance elements."""
    param = next(n for key, n in PARAM_BYTES.items() if f"classp_step_kernel{key}" in name)
    return param, next((n for key, n in IMPORTANCE_BYTES.items() if key in name), param)


def test_kernel_ptx_has_128_bit_streaming_loads(built):
    """Every variant of the step kernel: params and accumulators in 128-bit global loads and
    stores, grads in 128-bit loads with the streaming (evict-first) hint, nothing in local
    memory (the packs stay in registers)."""
    outputs, logs = built
    log, returncode = logs[KERNEL]
    assert returncode == 0 and outputs["ptx"] is not None, log
    kernels = step_kernels(outputs["ptx"].read_text(), r"\.entry\s+(\w+)")
    assert len(kernels) == VARIANTS, sorted(kernels)
    streaming = {}
    for name, body in kernels.items():
        assert re.search(r"ld\.global\.cg\.v4\.", body), name
        assert re.search(r"ld\.global\.cs\.v4\.", body), name
        assert re.search(r"st\.global\.cg\.v4\.", body), name
        assert not re.search(r"(ld|st)\.local", body), name
        streaming[name] = streamed_bytes(body)
    # with a penalty (PenaltyForm 1 explicit, 2 proximal), importances and anchors stream in
    # vector loads as the grads do (in 128-bit words, narrower importances in 64- or 32-bit
    # ones): the bytes of the same variant without, times (grad + anchor + importance) / grad
    for name, count in streaming.items():
        if "PenaltyFormE0E" not in name:
            plain = re.sub(r"PenaltyFormE[12]E", "PenaltyFormE0E", name)
            plain = re.sub(r"ImportanceFormatE[12]E", "ImportanceFormatE0E", plain)
            param, importance = element_bytes(name)
            assert count * param == streaming[plain] * (2 * param + importance), (
                name, count, streaming[plain])


def test_kernel_sass_has_128_bit_loads(built):
    """The machine code keeps the vector accesses: LDG.E.128 and STG.E.128 (needs cuobjdump)."""
    outputs, _ = built
    if CUOBJDUMP is None:
        pytest.skip("cuobjdump not found")
    sass = run_cuobjdump("-sass", str(outputs[KERNEL]))
    kernels = step_kernels(sass, r"Function\s*:\s*(\w+)")
    assert len(kernels) == VARIANTS, sorted(kernels)
    for name, body in kernels.items():
        assert re.search(r"LDG\.E(\.\w+)*\.128", body), name
        assert re.search(r"STG\.E(\.\w+)*\.128", body), name


def test_kernel_ptx_rounds_each_operation_and_steps_codes_by_warp(built):
    """No variant contracts a product into a fused multiply-add outside the library's exp2 and
    log2 (so the accumulators, compressed ones bit for bit, are the reference's), and the 8-bit
    variants read and write each lane's 8 codes as one 64-bit word, reduce a block over its warp
    (shuffles, a vote on whether it has a selected element) and keep their arrays in registers."""
    outputs, logs = built
    log, returncode = logs[KERNEL]
    assert returncode == 0 and outputs["ptx"] is not None, log
    kernels = step_kernels(outputs["ptx"].read_text(), r"\.entry\s+(\w+)")
    codes = [name for name in kernels if "AccFormatE2E" in name]
    assert len(codes) == CODE_VARIANTS, sorted(kernels)
    for name, body in kernels.items():
        if "PowerE2E" not in name:  # the generic power calls exp2 and log2
            assert not re.search(r"\bfma\.", body), name
    for name in codes:
        body = kernels[name]
        assert re.search(r"ld\.global\.cg\.v2\.u32", body), name
        assert re.search(r"st\.global\.cg\.v2\.u32", body), name
        assert re.search(r"vote\.sync\.ballot", body), name
        assert re.search(r"shfl\.sync\.bfly", body), name
