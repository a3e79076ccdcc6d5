"""Warnings name the user's line, whichever path led into randmask (its API, PEFT's, a first forward)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from tests.conftest import tiny_model

import randmask
from randmask.warn import caller_stacklevel, warn_caller


def _tied() -> torch.nn.Module:
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _line_after(frame) -> int:
    return frame.f_lineno + 1


def _only(record: list[warnings.WarningMessage], match: str) -> warnings.WarningMessage:
    found = [w for w in record if match in str(w.message)]
    assert len(found) == 1, [str(w.message) for w in record]
    return found[0]


def test_the_tied_weights_warning_names_the_callers_line_through_either_api():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line_after(inspect.currentframe())
        randmask.apply_masking(_tied(), randmask.MaskingConfig(targets=["q_proj", "lm_head"], density=0.2))
    found = _only(record, "tied weights")
    assert (found.filename, found.lineno) == (__file__, line)
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line_after(inspect.currentframe())
        get_peft_model(_tied(), RandMaskConfig(target_modules=["q_proj", "lm_head"], density=0.2))
    found = _only(record, "tied weights")  # through peft's and transformers' frames
    assert (found.filename, found.lineno) == (__file__, line)


def test_deleting_the_active_adapter_warns_at_the_callers_line():
    model = randmask.apply_masking(tiny_model("llama"), randmask.MaskingConfig(targets=["q_proj"], density=0.2))
    randmask.apply_masking(model, randmask.MaskingConfig(targets=["q_proj"], density=0.2, seed=1), adapter_name="b")
    randmask.set_adapter(model, "default")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line_after(inspect.currentframe())
        randmask.delete_adapter(model, "default")
    found = _only(record, "was active and is deleted")
    assert (found.filename, found.lineno) == (__file__, line)


def test_warn_caller_called_from_outside_the_library_names_that_line():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        line = _line_after(inspect.currentframe())
        warn_caller("plain", RuntimeWarning)
    assert (record[0].filename, record[0].lineno, record[0].category) == (__file__, line, RuntimeWarning)
    assert caller_stacklevel() == 2  # from this test's own frame: its caller (pytest) is outside the library
