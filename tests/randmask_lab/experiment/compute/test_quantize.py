"""``--quantize``: an identity field absent at its default, refused where it cannot apply, and a run on a
quantized tiny Llama (bitsandbytes NF4, torchao int8 and NF4Tensor) that trains the masked values only."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from safetensors.torch import load_file

from randmask_lab.experiment import RunConfig, RunError, run_training
from randmask_lab.experiment.results.report import method_label
from randmask_lab.experiment.run.config import OMITTED_AT_DEFAULT


def test_quantize_is_identity_and_absent_at_its_default():
    base = RunConfig(task="rte")
    assert OMITTED_AT_DEFAULT["quantize"] == "none" and "quantize" not in base.identity()  # old ids stand
    nf4 = dataclasses.replace(base, quantize="nf4")
    assert nf4.identity()["quantize"] == "nf4" and nf4.run_id != base.run_id
    assert method_label(nf4.to_dict()) == "randmask 1e-03 nf4" and method_label(base.to_dict()) == "randmask 1e-03"


@pytest.mark.parametrize("method", ["full", "bitfit", "adapter", "prefix", "adalora"])
def test_methods_that_train_or_wrap_base_weights_are_refused(method):
    with pytest.raises(RunError, match=f"works with randmask, structured, lora, zeroshot, not '{method}'"):
        RunConfig(method=method, quantize="nf4").validate()


@pytest.mark.parametrize("scheme", ["nf4", "int8", "ao-int8"])
def test_fsdp_over_a_quantized_base_is_refused_before_the_run(scheme):
    """bitsandbytes weights become plain integer shards under fully_shard (the library refuses them at the first
    forward), and torchao's Int8Tensor fails inside fully_shard: the runner says so before loading anything."""
    with pytest.raises(RunError, match=f"--fsdp cannot shard a --quantize {scheme} base: .* Use --quantize ao-nf4"):
        RunConfig(quantize=scheme, fsdp=True).validate()
    RunConfig(quantize=scheme).validate()
    RunConfig(fsdp=True).validate()
    RunConfig(quantize="ao-nf4", fsdp=True).validate()


def test_an_unknown_scheme_is_refused():
    with pytest.raises(RunError, match="--quantize must be one of none, nf4, fp4, int8, ao-int8, ao-int4, ao-nf4"):
        RunConfig(quantize="int3").validate()


@pytest.mark.parametrize(("method", "scheme"), [("randmask", "nf4"), ("randmask", "ao-int8"), ("lora", "nf4"),
                                               ("randmask", "ao-nf4"), ("lora", "ao-nf4")])
def test_a_run_on_a_quantized_tiny_llama(method, scheme, tiny_lm, run_kwargs):
    package = "torchao" if scheme.startswith("ao-") else "bitsandbytes"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    budget = {"ratio": 0.01} if method == "randmask" else {}
    record = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": method, "lr": 1e-2, "epochs": 1,
                                       "quantize": scheme, **budget}))
    assert record.status == "done" and record.test_metric is not None and record.config["quantize"] == scheme
    unquantized = run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "method": method, "lr": 1e-2,
                                            "epochs": 1, **budget}))
    assert record.total == unquantized.total and record.trainable == unquantized.trainable  # same budget, masks
    names = load_file(str(Path(record.run_dir) / "trainable" / "trainable.safetensors"))
    assert all((".values" in n) if method == "randmask" else ("lora_" in n) for n in names)


def test_ao_int4_on_a_cpu_names_the_schemes_that_run(tiny_lm, run_kwargs):
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    with pytest.raises(RunError, match="ao-int4 .* runs on CUDA only .* use ao-int8, nf4 or fp4"):
        run_training(RunConfig(**{**run_kwargs, "model": tiny_lm, "quantize": "ao-int4", "device": "cpu"}))


def test_a_4bit_base_loads_with_bitsandbytes_cpu_repacking_off(tiny_lm, monkeypatch):
    """bitsandbytes repacks 4-bit weights in place on an AVX512-bf16 CPU at an eval forward, and then passes no
    gradient through them: every method (LoRA too) trains through them, so the loader turns it off."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules
    import torch

    from randmask_lab.experiment.compute.quantize import quantization_config
    from randmask_lab.zoo import load_causal_lm

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # as on such a CPU
    model, _ = load_causal_lm(tiny_lm, torch.float32, quantization_config("nf4", torch.float32, torch.device("cpu")))
    four_bit = [m for m in model.modules() if isinstance(m, bnb_modules.Linear4bit)]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)


def test_ao_nf4_loads_every_decoder_linear_as_an_nf4tensor(tiny_lm):
    pytest.importorskip("torchao")
    import torch

    from randmask_lab.experiment.compute.quantize import quantization_config
    from randmask_lab.zoo import load_causal_lm

    model, _ = load_causal_lm(tiny_lm, torch.float32, quantization_config("ao-nf4", torch.float32,
                                                                          torch.device("cpu")))
    linears = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {type(m.weight).__name__ for m in linears} == {"NF4Tensor"}
