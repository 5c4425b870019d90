"""Builds classp_fused._C: the C++ CPU kernel always, the CUDA kernel when torch and nvcc have CUDA."""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# at::vec picks its vector code from the CPU_CAPABILITY defines; without them and -O3/-fopenmp the
# kernel runs 10-20x slower. The build targets the capability torch uses on this machine (AVX512
# runs the generic power 2.5x and p=1 about 1.2x faster than AVX2 in cache);
# CLASSP_FUSED_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 overrides it, e.g. for a build that must also
# run on older CPUs.
X86_FLAGS = ["-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mpopcnt"]
CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", *X86_FLAGS, "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", *X86_FLAGS,
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
is_x86 = platform.machine() in ("x86_64", "AMD64")
detected = torch.backends.cpu.get_cpu_capability() if is_x86 else "DEFAULT"
capability = os.environ.get("CLASSP_FUSED_CPU_CAPABILITY",
                            detected if detected in CAPABILITY_FLAGS else "DEFAULT")
if capability not in CAPABILITY_FLAGS or (capability != "DEFAULT" and not is_x86):
    raise ValueError(f"CLASSP_FUSED_CPU_CAPABILITY={capability!r} does not fit this machine; "
                     f"choose from {sorted(CAPABILITY_FLAGS)} (AVX2 and AVX512 on x86_64 only)")
# -ffp-contract=off: no FMA contraction, so results round as the reference's separate ops do.
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off",
             *CAPABILITY_FLAGS[capability]]
cpu_sources = ["csrc/classp_cpu.cpp", "csrc/classp_penalty_ops.cpp", "csrc/classp_module.cpp"]
cuda_sources = ["csrc/classp_cuda.cu", "csrc/classp_cuda_op.cpp"]
headers = sorted(glob.glob("csrc/*.h"))  # a changed header rebuilds the extension
with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
             and os.environ.get("CLASSP_FUSED_NO_CUDA", "0") != "1")

if with_cuda:
    # No --use_fast_math: the kernel's division, square root, exp2 and log2 stay IEEE-accurate.
    extension = CUDAExtension("classp_fused._C", cpu_sources + cuda_sources,
                              depends=headers,
                              extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                              extra_link_args=["-fopenmp"])
else:
    extension = CppExtension("classp_fused._C", cpu_sources, depends=headers,
                             extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
