"""Warnings attributed to the user's line, not to randmask's internals (nor PEFT's, transformers', torch's).

``warnings.warn(stacklevel=n)`` counts frames from the warning, so a fixed ``n`` points at a different place for each
path into it (``apply_masking`` vs ``get_peft_model``, a first forward under HF ``Trainer``), usually inside a library.
``warn_caller`` walks out to the first frame outside the library packages a call passes through, what Python 3.12's
``skip_file_prefixes`` does, for 3.10 and 3.11 too. Python's default filter then shows a warning once per user line.
"""

from __future__ import annotations

import os
import sys
import warnings

# The packages between a user's line and a randmask warning: randmask itself and the frameworks that call into it.
LIBRARY_PACKAGES = ("randmask", "peft", "transformers", "accelerate", "trl", "torch")


def _library_folders() -> tuple[str, ...]:
    """The folders of the library packages imported so far (a package not imported holds no frame), each ending in a
    separator, so that ``randmask/`` does not take in ``randmask_lab/``."""
    folders = []
    for name in LIBRARY_PACKAGES:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            folders.append(os.path.dirname(os.path.abspath(file)) + os.sep)
    return tuple(folders)


def _inside(filename: str, folders: tuple[str, ...]) -> bool:
    """Whether a frame's file lies in a library folder, or in the import machinery (an import-time warning names the
    ``import`` line, not ``<frozen importlib._bootstrap>``)."""
    return filename.startswith("<frozen importlib") or os.path.abspath(filename).startswith(folders)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller of this function name the first frame outside
    the library packages (2, the caller's caller, when every frame is inside: a script run from a library folder)."""
    folders = _library_folders()
    frame, depth = sys._getframe(2), 2  # depth 2: the frame that the caller's stacklevel=2 would name
    while frame is not None and _inside(frame.f_code.co_filename, folders):
        frame, depth = frame.f_back, depth + 1
    return depth if frame is not None else 2


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside randmask and the frameworks that
    call it: the user's call or training-loop line."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())


__all__ = ["LIBRARY_PACKAGES", "caller_stacklevel", "warn_caller"]
