"""A target whose weight is tied to another module (``tie_word_embeddings``: lm_head's weight is the input embedding).

Written into in place, the delta reached the embedding too, one forward late: two identical forwards gave different
losses (5.34, then 6.69), and the gradient missed the embedding's use. Such a target now adds its delta beside the
weight, as LoRA does: the embedding keeps W0, the model trains as its untied copy does, and merging is refused.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import hessian_vector_product, model_output, tiny_inputs, tiny_model, train_steps

import randmask
from randmask import MaskingConfig, MaskingError, apply_masking, load_adapter, masked_layers, merge_and_unload, unload
from randmask.targets import resolve_targets, weight_ties

CFG = MaskingConfig(targets=["lm_head", "q_proj"], density=0.2, seed=0)


def _tied() -> torch.nn.Module:
    model = tiny_model("llama")
    model.lm_head.weight = model.model.embed_tokens.weight  # what tie_word_embeddings=True does
    return model


def _untied_copy() -> torch.nn.Module:
    """The same numbers, lm_head holding its own copy of the embedding: the reference a tied target must match."""
    model = tiny_model("llama")
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    return model


def _masked_tied() -> torch.nn.Module:
    with pytest.warns(UserWarning, match=r"tied weights \(lm_head with model.embed_tokens\)"):
        return apply_masking(_tied(), CFG)


def test_ties_are_found_by_parameter_identity():
    tied, untied = _tied(), _untied_copy()
    assert weight_ties(tied, resolve_targets(tied, CFG.targets)) == {"lm_head": ("model.embed_tokens",)}
    assert weight_ties(untied, resolve_targets(untied, CFG.targets)) == {}


def test_a_tied_target_trains_as_its_untied_copy_and_the_embedding_keeps_w0():
    inputs = tiny_inputs("llama")
    model, reference = _masked_tied(), apply_masking(_untied_copy(), CFG)
    layers = masked_layers(model)
    assert layers["lm_head"].delta_path and not layers["model.layers.0.self_attn.q_proj"].delta_path
    embedding = model.model.embed_tokens.weight.detach().clone()
    losses, reference_losses = train_steps(model, inputs), train_steps(reference, inputs)
    torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(model_output(model, inputs), model_output(reference, inputs), rtol=1e-5, atol=1e-6)
    # the same input twice gives the same loss (it drifted by a forward's write before)
    assert model(**inputs).loss.item() == model(**inputs).loss.item()


def test_hessian_vector_products_of_a_tied_target_equal_its_untied_copys():
    """``randmask hessian`` runs double backward: through the delta path it equals the in-place path of the untied copy
    (it raised NotImplementedError before)."""
    inputs = tiny_inputs("llama")
    model, reference = _masked_tied(), apply_masking(_untied_copy(), CFG)
    train_steps(model, inputs)  # nonzero values: the delta's own term in dL/dx enters the product
    train_steps(reference, inputs)
    torch.testing.assert_close(hessian_vector_product(model, inputs), hessian_vector_product(reference, inputs),
                               rtol=1e-4, atol=1e-5)


def test_merging_a_tied_target_is_refused_and_unload_restores_the_base():
    inputs = tiny_inputs("llama")
    model = _masked_tied()
    base = model_output(_tied(), inputs)
    train_steps(model, inputs)
    adapted = model_output(model, inputs)
    with pytest.raises(MaskingError, match=r"lm_head's weight is tied to model.embed_tokens: merging would write"):
        merge_and_unload(model)
    assert torch.equal(model_output(model, inputs), adapted)  # nothing changed
    plain = unload(model)
    assert masked_layers(plain) == {} and torch.equal(model_output(plain, inputs), base)
    assert not randmask.paths.weight_shared_with(plain.lm_head)


def test_a_tied_adapter_saves_and_loads_with_identical_outputs(tmp_path):
    inputs = tiny_inputs("llama")
    model = _masked_tied()
    train_steps(model, inputs)
    randmask.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = load_adapter(_tied(), tmp_path)
    assert masked_layers(loaded)["lm_head"].delta_path
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))


def test_the_peft_path_keeps_the_embedding_and_refuses_the_merge(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel, get_peft_model

    from randmask.peft import RandMaskConfig

    inputs = tiny_inputs("llama")
    config = RandMaskConfig(target_modules=["lm_head", "q_proj"], density=0.2, seed=0)
    with pytest.warns(UserWarning, match="tied weights"):
        model = get_peft_model(_tied(), config)
    reference = get_peft_model(_untied_copy(), config)
    embedding = model.base_model.model.model.embed_tokens.weight.detach().clone()
    torch.testing.assert_close(train_steps(model, inputs), train_steps(reference, inputs), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.base_model.model.model.embed_tokens.weight, embedding)
    with pytest.raises(MaskingError, match="tied to model.embed_tokens"):
        model.merge_and_unload()
    with pytest.warns(UserWarning, match=r"PEFT saved base weights \['base_model.model.lm_head.base_layer.weight'\]"):
        model.save_pretrained(tmp_path)  # save_embedding_layers='auto' saved lm_head's base weight: left out
    assert all(".base_layer." not in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = PeftModel.from_pretrained(_tied(), tmp_path)
    assert torch.equal(model_output(loaded, inputs), model_output(model, inputs))


def _fsdp2_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from tests.conftest import end_spawned_rank, start_spawned_rank
    from tests.randmask.test_fsdp2 import WORLD, _train
    from torch.distributed.fsdp import fully_shard

    start_spawned_rank(rank, port, WORLD)
    dist.init_process_group("gloo")
    warnings.simplefilter("ignore", UserWarning)
    model = apply_masking(_tied(), CFG)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the tied embedding / lm_head weight is the root's
    losses = _train(model, slice(2 * rank, 2 * rank + 2))
    if rank == 0:
        torch.save(torch.tensor(losses, dtype=torch.float64), f"{out}/losses.pt")
    dist.barrier()
    end_spawned_rank()


def test_a_tied_target_under_fsdp2_trains_as_one_process(tmp_path):
    """The delta path on a float weight under FSDP2 (2 gloo ranks): the losses of one process."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from tests.conftest import free_port
    from tests.randmask.test_fsdp2 import WORLD, _train

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        single = apply_masking(_tied(), CFG)
    expected = torch.tensor(_train(single, slice(None)), dtype=torch.float64)
    torch.testing.assert_close(torch.load(tmp_path / "losses.pt"), expected, rtol=0, atol=1e-5)


def test_tie_weights_after_masking_is_a_no_op_and_a_new_weight_is_refused():
    """transformers' tie_weights (accelerate's FSDP preparation and Trainer's resume call it) assigns the embedding's
    weight to lm_head.weight: it raised KeyError("attribute 'weight' already exists") on a masked lm_head."""
    inputs = tiny_inputs("llama")
    model = _masked_tied()
    model.config.tie_word_embeddings = True
    train_steps(model, inputs)
    out = model_output(model, inputs)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model_output(model, inputs), out)
    with pytest.raises(MaskingError, match="the weight of masked layer Linear cannot be replaced"):
        model.lm_head.weight = torch.nn.Parameter(torch.zeros(140, 32))
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peft_model = get_peft_model(_tied(), RandMaskConfig(target_modules=["lm_head"], density=0.2))
    lm_head = peft_model.base_model.model.lm_head
    lm_head.weight = peft_model.base_model.model.model.embed_tokens.weight  # what tie_weights assigns
    with pytest.raises(MaskingError, match="cannot be replaced"):
        lm_head.weight = torch.nn.Parameter(torch.zeros(140, 32))


def test_a_resize_after_masking_a_tied_head_is_refused_at_the_next_forward():
    """resize_token_embeddings swaps the tied embedding's data in place (no assignment, no hook), so lm_head's weight
    grows under its adapter: the forward failed on a raw shape mismatch, and now names the cause and the fix."""
    inputs = tiny_inputs("llama")
    model = _masked_tied()
    model.config.tie_word_embeddings = True
    model.resize_token_embeddings(136)
    assert model.lm_head.weight.shape == (136, 32)
    with pytest.raises(MaskingError, match=r"base now gives 136 outputs, its adapter was made for 128: .* Resize "
                                           "before masking"):
        model(**inputs)
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peft_model = get_peft_model(_tied(), RandMaskConfig(target_modules=["lm_head"], density=0.2))
    peft_model.base_model.model.config.tie_word_embeddings = True
    peft_model.base_model.model.resize_token_embeddings(136)
    with pytest.raises(MaskingError, match="base now gives 136 outputs"):
        peft_model(**inputs)
