"""The one kernel chooser (``randmask.kernels``): RANDMASK_KERNEL, its fallbacks and its errors."""

from __future__ import annotations

import pytest
import torch

from randmask import MaskingError, kernels, native
from randmask.kernels import KERNEL_ENV, kernel_setting, weight_gradient_kernel
from randmask.pattern import SparsePattern
from randmask.sddmm import weight_gradient_path


def test_the_weight_gradient_kernel_is_native_only_on_the_cpu():
    assert weight_gradient_kernel("cuda") in ("triton", "torch")  # triton where randmask[gpu] is installed
    assert weight_gradient_kernel("cpu") == ("native" if native.available() else "torch")
    empty = SparsePattern(torch.zeros(0, dtype=torch.long), (7, 5), False)
    assert weight_gradient_path(torch.randn(3, 7), torch.randn(3, 5), empty) == "empty"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv(KERNEL_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MaskingError, match="TRITON_INTERPRET=1"):
        weight_gradient_kernel("cpu")


def test_a_forced_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "triton")
    monkeypatch.setattr(kernels, "_TRITON", [None])  # as if triton were not installed
    with pytest.raises(MaskingError, match=r"randmask\[gpu\]"):
        weight_gradient_kernel("cuda")
    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert weight_gradient_kernel("cuda") == "torch"  # auto falls back quietly: triton is optional


def test_the_switch(monkeypatch):
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert weight_gradient_kernel("cpu") == weight_gradient_kernel("cuda") == "torch"
    monkeypatch.setenv(KERNEL_ENV, "native")
    with pytest.raises(MaskingError, match="CPU tensors"):
        weight_gradient_kernel("cuda")
    monkeypatch.setenv(KERNEL_ENV, "fastest")
    with pytest.raises(MaskingError, match="auto, native, triton, torch"):
        weight_gradient_kernel("cpu")
    monkeypatch.setenv(KERNEL_ENV, "native")
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    with pytest.raises(MaskingError, match="contradicts"):
        kernel_setting()
    monkeypatch.delenv(KERNEL_ENV)
    assert kernel_setting() == "torch"  # RANDMASK_NATIVE=0 is an alias of torch
    assert weight_gradient_kernel("cpu") == "torch"
