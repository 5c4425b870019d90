"""Compiling the Triton kernel to real GPU code without a GPU: a test's script runs in a
process of its own, out of the interpreter, and prints its findings as JSON on its last line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_results(script: str) -> list:
    """The JSON list ``script`` prints last, run with the kernels compiled (no
    ``TRITON_INTERPRET``) and floating-point fusion on, as torch.compile compiles user kernels;
    skips where this triton cannot compile ahead of time (``triton.compile(ASTSource,
    target=GPUTarget)``)."""
    compiler = pytest.importorskip("triton.compiler")
    backends = pytest.importorskip("triton.backends.compiler")
    if not (hasattr(compiler, "ASTSource") and hasattr(backends, "GPUTarget")):
        pytest.skip("this triton has no triton.compile(ASTSource, target=GPUTarget) API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])
