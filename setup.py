"""Builds classp_fused._C: the C++ CPU kernel always, the CUDA kernel when torch and nvcc have CUDA."""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
if platform.machine() in ("x86_64", "AMD64"):
    cxx_flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
sources = sorted(glob.glob("csrc/*.cpp"))
with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
             and os.environ.get("CLASSP_FUSED_NO_CUDA", "0") != "1")

if with_cuda:
    extension = CUDAExtension(
        "classp_fused._C", sources + sorted(glob.glob("csrc/*.cu")),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
        extra_link_args=["-fopenmp"])
else:
    extension = CppExtension("classp_fused._C", sources, extra_compile_args=cxx_flags,
                             extra_link_args=["-fopenmp"])

setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})
