"""Test set-up: Triton kernels run on CPU tensors through the interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    # Read by triton when @triton.jit decorates, so it must be set before classp_fused is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
