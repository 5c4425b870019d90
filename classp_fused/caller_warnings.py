"""Warnings that point at the user's line: the first frame outside this package and the
libraries that call into it (torch's ``Optimizer`` and ``GradScaler``, the Hugging Face
Trainer, Lightning, accelerate), so a warning raised deep inside a step, a callback or a
consolidate names the line that started it."""
from __future__ import annotations

import os
import sys
import warnings

# Packages whose frames are skipped where they are loaded.
_CALLING_LIBRARIES = ("torch", "transformers", "accelerate", "lightning", "pytorch_lightning")


def _internal_prefixes() -> tuple[str, ...]:
    names = (__package__,) + _CALLING_LIBRARIES
    return tuple(os.path.dirname(sys.modules[name].__file__) + os.sep
                 for name in names if getattr(sys.modules.get(name), "__file__", None))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first caller outside classp_fused and the
    libraries that call it."""
    internal = _internal_prefixes()
    frame, level = sys._getframe(1), 2  # this function's caller is stacklevel 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
