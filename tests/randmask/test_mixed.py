"""Mixed batches (free-function API): each sample through its own adapter equals running it alone."""

import copy

import pytest
import torch
from tests.conftest import tiny_model

import randmask
from randmask import BASE_ADAPTER, MaskingConfig, MaskingError, apply_masking, mixed_batch, set_adapter
from randmask import mixed as mixed_module
from randmask.mixed import group_rows

NAMES = ["a", "b", "c"]


def _multi(arch, dtype=torch.float32, density=0.1, targets=None):
    """A tiny model with three adapters of random values (c on the value projection only, where it has one)."""
    model = tiny_model(arch).to(dtype)
    for seed, name in enumerate(NAMES):
        t = targets if name != "c" else (["v_proj"] if arch in ("llama", "opt") else targets)
        apply_masking(model, MaskingConfig(targets=t, density=density, seed=seed), adapter_name=name)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in randmask.masked_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.values.copy_(torch.randn(adapter.nnz, generator=gen) * 0.3)
    return model


def _alone(model, ids, names):
    """Each row run by itself (batch 1) with its adapter active (the reference)."""
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == BASE_ADAPTER:
                with randmask.disable_adapter(model):
                    rows.append(model(ids[i:i + 1]).logits)
            else:
                set_adapter(model, name)
                rows.append(model(ids[i:i + 1]).logits)
    return torch.cat(rows)


@pytest.fixture(params=["gathered", "per_group"])
def kernel(request, monkeypatch):
    """Both kernels of the mixed batch: one gather/scatter for all groups, or one SpMM per group."""
    monkeypatch.setattr(mixed_module, "GATHERED_MAX_ELEMENTS", 1 << 40 if request.param == "gathered" else -1)
    return request.param


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
@pytest.mark.parametrize("names", [["a", BASE_ADAPTER, "c", "a", "b"],  # scattered rows: index_select path
                                   ["b", "b", "a", "a", BASE_ADAPTER]])  # contiguous rows: slice path
def test_mixed_batch_equals_each_sample_alone_fp32(arch, names, kernel):
    model = _multi(arch)
    ids = torch.randint(0, 128, (len(names), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mixed_batch(model, names):
        out = model(ids).logits
    ref = _alone(model, ids, names)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.equal(ref[0], ref[1])  # the adapters do change the output


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2"])
def test_mixed_batch_bf16_within_stated_tolerance(arch, kernel):
    """bf16: the delta path adds the delta (computed in fp32, rounded once) to the bf16 base output; the in-place
    path rounds W0 + v to bf16 first. Stated tolerance: 1e-2 absolute on logits of magnitude ~0.5, i.e. about two
    bf16 ulps there (measured: at most 3.9e-3, one ulp, on these three architectures)."""
    model = _multi(arch, dtype=torch.bfloat16)
    names = ["a", "b", BASE_ADAPTER, "c"]
    ids = torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), mixed_batch(model, names):
        out = model(ids).logits
    ref = _alone(model, ids, names)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=0)


def test_generate_with_a_mixed_batch_equals_each_prompt_alone(kernel):
    model = _multi("llama")
    names = ["c", BASE_ADAPTER, "a"]
    ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), mixed_batch(model, names):
        together = model.generate(ids, **kw)
    alone = []
    for i, name in enumerate(names):
        if name == BASE_ADAPTER:
            with randmask.disable_adapter(model):
                alone.append(model.generate(ids[i:i + 1], **kw))
        else:
            set_adapter(model, name)
            alone.append(model.generate(ids[i:i + 1], **kw))
    assert torch.equal(together, torch.cat(alone))


def test_an_adapter_added_or_replaced_between_mixed_batches_is_served(kernel):
    """Each layer keeps its gathered tables across batches: a new adapter, or a new one under an old name, must
    rebuild them (``randmask.mixed.layer_tables``)."""
    model = _multi("llama")
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(5)

    def served(names):
        with torch.no_grad(), mixed_batch(model, names):
            out = model(ids).logits
        torch.testing.assert_close(out, _alone(model, ids, names), atol=1e-5, rtol=0)

    served(["a", "b", "a", "c"])
    apply_masking(model, MaskingConfig(targets=["q_proj", "v_proj"], density=0.3, seed=7), adapter_name="d")
    with torch.no_grad():
        for layer in randmask.masked_layers(model).values():
            layer.adapters["d"].values.copy_(torch.randn(layer.adapters["d"].nnz, generator=gen) * 0.3)
    served(["d", "a", BASE_ADAPTER, "b"])
    other = _multi("llama")  # the same base: its adapter "e" (another mask) goes in under the name "a"
    apply_masking(other, MaskingConfig(targets=["q_proj", "v_proj"], density=0.1, seed=11), adapter_name="e")
    with torch.no_grad():
        for name, layer in randmask.masked_layers(model).items():
            layer.adapters["a"] = randmask.masked_layers(other)[name].adapters["e"]
            layer.adapters["a"].values.copy_(torch.randn(layer.adapters["a"].nnz, generator=gen) * 0.3)
    served(["d", "a", BASE_ADAPTER, "a"])


def test_beams_take_rows_per_name():
    model = _multi("llama")
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 4, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), mixed_batch(model, ["b", "a"], rows_per_name=3):
        together = model.generate(ids, **kw)
    set_adapter(model, "b")
    first = model.generate(ids[:1], **kw)
    assert torch.equal(together[:1], first)
    with pytest.raises(MaskingError, match="one adapter name per sample"), mixed_batch(model, ["b", "a"]):
        model.generate(ids, **kw)  # 6 rows (beams) for 2 names, rows_per_name not given


def test_after_a_mixed_batch_the_active_adapter_is_back_bit_for_bit():
    model = _multi("opt")
    set_adapter(model, "b")
    weights = {n: layer.weight.detach().clone() for n, layer in randmask.masked_layers(model).items()}
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
        with mixed_batch(model, ["a", BASE_ADAPTER]):
            for layer in randmask.masked_layers(model).values():
                assert torch.equal(layer.weight.view(-1)[layer.adapters["b"].indices], layer.adapters["b"].base_values)
            model(ids)
        after = model(ids).logits
    assert torch.equal(before, after)
    for name, layer in randmask.masked_layers(model).items():
        assert torch.equal(layer.weight, weights[name])


def test_what_a_mixed_batch_does_not_honour_is_refused():
    model = _multi("llama")
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(MaskingError, match="does not have"), mixed_batch(model, ["a", "nope"]):
        pass
    with pytest.raises(MaskingError, match="one adapter name per sample"), mixed_batch(model, ["a", "b", "c"]):
        model(ids)
    with pytest.raises(MaskingError, match="list"), mixed_batch(model, "a"):
        pass
    with pytest.raises(MaskingError, match="do not nest"), mixed_batch(model, ["a", "b"]), mixed_batch(model, ["a"]):
        pass
    with pytest.raises(MaskingError, match="disable_adapter"), randmask.disable_adapter(model), \
            mixed_batch(model, ["a", "b"]):
        pass
    model.train()
    with pytest.raises(MaskingError, match="eval"), mixed_batch(model, ["a", "b"]):
        pass


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_peft_forward_kwargs_are_refused_not_swallowed(arch):
    """transformers' forward takes **kwargs, so without the guard adapter_names= ran the active adapter on every row."""
    model = _multi(arch).eval()
    ids = torch.randint(0, 64, (2, 5))
    with pytest.raises(MaskingError, match=r"adapter_names=.*randmask.mixed_batch"):
        model(ids, adapter_names=["a", "b"])
    with pytest.raises(MaskingError, match="alora_offsets="):
        model(input_ids=ids, alora_offsets=[1, 1])
    clone = copy.deepcopy(model)
    with pytest.raises(MaskingError, match="adapter_names="):
        clone(ids, adapter_names=["a", "b"])
    with mixed_batch(model, ["a", "b"]):  # the way that honours it
        model(ids)
    plain = randmask.unload(clone)  # an ordinary model again: its forward is the model's own
    assert not plain._forward_pre_hooks
    with pytest.raises(MaskingError, match="adapter_names="):
        model(ids, adapter_names=["a", "b"])  # the original keeps its guard


def test_group_rows_spans_and_indices():
    groups = group_rows(["x", BASE_ADAPTER, "y", "x"], rows_per_name=2)
    assert groups.rows == 8
    assert [name for name, _ in groups.groups] == ["x", "y"]
    assert groups.groups[0][1].tolist() == [0, 1, 6, 7] and groups.spans[0] is None
    assert groups.groups[1][1].tolist() == [4, 5] and groups.spans[1] == (4, 6)


def test_with_slots_numbers_every_adapter_of_the_model_not_only_the_batch():
    groups = group_rows(["y", BASE_ADAPTER, "x"]).with_slots({"z", "x", "y"})
    assert groups.slots == ("x", "y", "z")  # sorted: the same for every batch of the model
    assert groups.row_slot.tolist() == [1, 3, 0]  # no adapter: len(slots)
    assert groups.names == ("y", BASE_ADAPTER, "x") and groups.spans == ((0, 1), (2, 3))  # the rest as it was
    assert [(name, rows.tolist()) for name, rows in groups.groups] == [("y", [0]), ("x", [2])]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear and the transposed Conv1D
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 7), (5,)])  # (batch, tokens, in) and (batch, in)
def test_the_traced_layout_equals_the_eager_one(arch, dtype, shape, kernel):
    """traced_mixed_forward (what torch.compile runs) against mixed_forward's eager layouts, called directly."""
    model = _multi(arch, dtype=dtype)
    names = ["c", BASE_ADAPTER, "a", "b", "a"]
    groups = group_rows(names).with_slots(NAMES)
    for layer in randmask.masked_layers(model).values():
        layer.restore_base()  # W0 in the weight, as in a mixed batch
        x = torch.randn(*shape, layer.base_layer.weight.shape[1 if not layer.transposed else 0],
                        generator=torch.Generator().manual_seed(0)).to(dtype)
        with torch.no_grad():
            traced = mixed_module.traced_mixed_forward(layer.base_layer, x, layer.adapters, groups)
            eager = mixed_module.mixed_forward(layer.base_layer, x, layer.adapters, groups)
        torch.testing.assert_close(traced, eager, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    with pytest.raises(MaskingError, match="names 5 samples but a masked layer got input of shape"):
        mixed_module.traced_mixed_forward(layer.base_layer, x[:3], layer.adapters, groups)
