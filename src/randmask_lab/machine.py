"""What machine a timing was made on: CPU model, torch's CPU capability, native bf16, accelerator.

Why it matters: machines of one kind differ. An AVX2-only CPU (no AVX-512, no AMX) runs a bf16
matmul ~48x slower than fp32 in torch 2.13, while an AMX CPU runs it ~4x faster. So a step time,
a benchmark ratio or a forecast means something only beside the CPU it was measured on, and the
precision a run should use depends on it (``randmask_lab.experiment.compute.precision.resolve_precision``).
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path
from typing import Any

import torch


@cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_capability() -> str:
    """torch's CPU capability: ``AVX512``, ``AVX2``, ``DEFAULT``, ... (what its kernels dispatch on)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


@cache
def cpu_bf16_native() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AMX or avx512_bf16): oneDNN's own check."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_bf16_native() -> bool:
    """Whether a CUDA device runs bf16 natively (Ampere and newer)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matmuls at least as fast as fp32 (CPU: oneDNN's check; CUDA: compute >= 8)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_bf16_native()
    if kind == "cuda":
        return cuda_bf16_native()
    return False


def cpu_kind() -> str:
    """A short key that groups machines whose timings compare: ``<capability>/<bf16|no-bf16>``.

    The model name is left out on purpose: VMs report the same CPU under several names, and what
    decides speed here is the vector ISA torch dispatches to and whether bf16 is native.
    """
    return f"{cpu_capability()}/{'bf16' if cpu_bf16_native() else 'no-bf16'}"


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The fields every timing carries: CPU model, torch CPU capability, native bf16, and the device used."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_bf16_native": cpu_bf16_native(),
        "cpu_kind": cpu_kind(),
        "torch": torch.__version__,
    }
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_bf16_native"] = cuda_bf16_native()
    else:
        info["device"] = "cpu"
    return info


def describe(info: dict[str, Any] | None = None) -> str:
    """One line for a table caption: ``AMD EPYC (AVX2, bf16 not native), torch 2.13.0+cpu``."""
    info = info or machine_info()
    bf16 = "bf16 native" if info.get("cpu_bf16_native") else "bf16 not native"
    where = "" if info.get("device", "cpu") == "cpu" else f", on {info['device']}"
    cpu = f"{info.get('cpu_model', '?')} ({info.get('cpu_capability', '?')}, {bf16})"
    return f"{cpu}, torch {info.get('torch', '?')}{where}"
