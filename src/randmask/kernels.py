"""Which weight-gradient (SDDMM) kernel runs: the one chooser, read from ``$RANDMASK_KERNEL``.

``auto`` (the default) takes the native kernel (``randmask.native``) on the CPU where it builds and the Triton
kernel (``randmask.triton_sddmm``, imported lazily) on CUDA where triton is installed, else the torch paths. A
forced kernel that cannot run here is a MaskingError, never a quiet fallback. ``randmask.sddmm`` asks this
module, then picks the path by density.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from randmask import native
from randmask.config import MaskingError
from randmask.warn import warn_caller

KERNEL_ENV = "RANDMASK_KERNEL"
KERNELS = ("auto", "native", "triton", "torch")
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_setting() -> str:
    """``$RANDMASK_KERNEL`` (auto when unset); ``RANDMASK_NATIVE=0``, the older switch, means ``torch``."""
    value = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if value not in KERNELS:
        raise MaskingError(f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r} is not a kernel; use one of {', '.join(KERNELS)}.")
    if os.environ.get(native.DISABLE_ENV) == "0":
        if value not in ("auto", "torch"):
            raise MaskingError(f"{KERNEL_ENV}={value} contradicts {native.DISABLE_ENV}=0 (an alias of "
                               f"{KERNEL_ENV}=torch); unset one of them.")
        return "torch"
    return value


def weight_gradient_kernel(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """The SDDMM kernel the backward runs for work on ``device`` in ``dtype``: "native" (randmask.native, CPU
    fp32/bf16), "triton" (randmask.triton_sddmm, CUDA fp32/bf16/fp16) or "torch" (the torch paths).

    The one place the kernel is chosen. ``RANDMASK_KERNEL=auto`` (default) takes native on the CPU where it builds
    and triton on CUDA where it is installed, else torch; ``native``/``triton``/``torch`` force one, and a forced
    kernel that cannot run here is a MaskingError, never a quiet fallback. Work in a dtype the kernel does not
    take (fp64; fp16 for native) runs the torch paths.
    """
    setting = kernel_setting()
    kind = torch.device(device).type
    if setting == "torch":
        return "torch"
    if setting == "native" or (setting == "auto" and kind == "cpu"):
        if kind != "cpu":
            raise MaskingError(f"{KERNEL_ENV}=native: the native kernel runs on CPU tensors, this work is on {kind}. "
                               f"Use {KERNEL_ENV}=auto or triton.")
        if dtype not in NATIVE_DTYPES:
            return "torch"
        if native.available():
            return "native"
        if setting == "native":
            raise MaskingError(f"{KERNEL_ENV}=native but the native kernel did not build here (no C compiler, or "
                               f"a build error warned about above). Use {KERNEL_ENV}=auto.")
        return "torch"
    if setting == "auto" and kind != "cuda":
        return "torch"
    # triton: forced, or auto on CUDA
    if dtype not in TRITON_DTYPES:
        return "torch"
    if setting == "triton":
        if kind == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "on"):
            raise MaskingError(f"{KERNEL_ENV}=triton: Triton runs CUDA tensors; on CPU tensors only under "
                               f"TRITON_INTERPRET=1 (slow: for tests). Use a CUDA device or {KERNEL_ENV}=auto.")
        if kind not in ("cpu", "cuda"):
            raise MaskingError(f"{KERNEL_ENV}=triton: Triton runs CUDA tensors, this work is on {kind}.")
        triton_kernel(required=True)
        return "triton"
    return "triton" if triton_kernel(required=False) is not None else "torch"


_TRITON: list[ModuleType | None] = []  # [module or None] once tried


def triton_kernel(required: bool) -> ModuleType | None:
    """randmask.triton_sddmm, imported on first use (None when triton is missing, unless ``required``)."""
    if not _TRITON:
        module = None
        if importlib.util.find_spec("triton") is not None:
            try:
                module = importlib.import_module("randmask.triton_sddmm")
            except (ImportError, RuntimeError) as err:  # a triton that does not load here (driver, version)
                warn_caller(f"randmask: triton is installed but does not load ({err}); the torch paths run. "
                            f"Set {KERNEL_ENV}=torch to skip the attempt.", RuntimeWarning)
        _TRITON.append(module)
    if _TRITON[0] is None and required:
        raise MaskingError(f"{KERNEL_ENV}=triton but triton is not installed (or did not load): pip install "
                           "'randmask[gpu]'.")
    return _TRITON[0]


__all__ = [
    "KERNELS",
    "KERNEL_ENV",
    "NATIVE_DTYPES",
    "TRITON_DTYPES",
    "kernel_setting",
    "triton_kernel",
    "weight_gradient_kernel",
]
