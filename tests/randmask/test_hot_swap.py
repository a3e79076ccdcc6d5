"""Hot-swap: switching the active adapter touches O(nnz) entries, allocates nothing dense, reloads nothing."""

import pytest
import torch
from tests.conftest import model_output, tiny_inputs, tiny_model, train_steps
from torch.utils._python_dispatch import TorchDispatchMode

import randmask
from randmask import MaskingConfig, apply_masking


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op returns in new memory (views, detach, in-place: none)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.sizes.append(0 if t.untyped_storage().data_ptr() in inputs else t.numel())
        return out


def _two(arch):
    model = tiny_model(arch)
    for seed, name in enumerate(["a", "b"]):
        apply_masking(model, MaskingConfig(density=0.02, seed=seed), adapter_name=name)
        with torch.no_grad():
            for layer in randmask.masked_layers(model).values():
                layer.adapters[name].values.normal_()
    return model


def _touched_within_masks(before, after, layers, names):
    for key, layer in layers.items():
        changed = (before[key] != after[key]).view(-1).nonzero().squeeze(1)
        allowed = torch.cat([layer.adapters[n].indices for n in names])
        assert torch.isin(changed, allowed).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_set_adapter_writes_only_the_two_masks_and_allocates_o_nnz(arch):
    model = _two(arch)
    layers = randmask.masked_layers(model)
    randmask.set_adapter(model, "a")
    before = {k: layer.weight.detach().clone() for k, layer in layers.items()}
    pointers = {k: layer.weight.data_ptr() for k, layer in layers.items()}
    with _Allocations() as seen:
        randmask.set_adapter(model, "b")
    after = {k: layer.weight.detach().clone() for k, layer in layers.items()}
    _touched_within_masks(before, after, layers, ["a", "b"])
    largest_nnz = max(layer.adapters[n].nnz for layer in layers.values() for n in ("a", "b"))
    smallest_weight = min(layer.weight.numel() for layer in layers.values())
    assert max(seen.sizes) <= largest_nnz < smallest_weight  # nothing weight-sized was made
    assert {k: layer.weight.data_ptr() for k, layer in layers.items()} == pointers  # written in place
    for layer in layers.values():  # and the weight now holds W0 + b's values at b's entries
        b = layer.adapters["b"]
        torch.testing.assert_close(layer.weight.view(-1)[b.indices], b.base_values + b.values.detach())


def test_peft_set_adapter_writes_eagerly_and_o_nnz():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig, RandMaskLayer

    model = get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.02, seed=0), adapter_name="x")
    model.add_adapter("y", RandMaskConfig(density=0.02, seed=1))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RandMaskLayer)}
    with torch.no_grad():
        for layer in layers.values():
            for adapter in layer.randmask_adapters.values():
                adapter.values.normal_()
    model.set_adapter("x")
    before = {k: layer.get_base_layer().weight.detach().clone() for k, layer in layers.items()}
    with _Allocations() as seen:
        model.set_adapter("y")
    after = {k: layer.get_base_layer().weight.detach().clone() for k, layer in layers.items()}
    for key, layer in layers.items():
        b = layer.randmask_adapters["y"]
        torch.testing.assert_close(after[key].view(-1)[b.indices], b.base_values + b.values.detach())
        changed = (before[key] != after[key]).view(-1).nonzero().squeeze(1)
        assert torch.isin(changed, torch.cat([layer.randmask_adapters[n].indices for n in "xy"])).all()
    largest_nnz = max(a.nnz for layer in layers.values() for a in layer.randmask_adapters.values())
    assert max(seen.sizes) <= largest_nnz


def _held(adapters) -> set[str]:
    return {name for name, adapter in adapters.items() if adapter.base_values is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_active_adapter_holds_its_w0_and_every_switch_stays_exact(arch, tmp_path):
    pristine = {n: p.detach().clone() for n, p in tiny_model(arch).state_dict().items()}
    model = tiny_model(arch)
    for seed, name in enumerate(["a", "b", "c"]):  # density 0.3: the masks overlap
        apply_masking(model, MaskingConfig(density=0.3, seed=seed), adapter_name=name)
        with torch.no_grad():
            for layer in randmask.masked_layers(model).values():
                layer.adapters[name].values.normal_()
    layers = randmask.masked_layers(model).values()
    randmask.save_adapter(model, tmp_path / "c_active", adapter_name="c")
    for name in ["a", "b", "c", "a", "c", "b"]:
        randmask.set_adapter(model, name)
        for layer in layers:
            assert _held(layer.adapters) == {name}
            held = layer.adapters[name].base_values
            assert torch.equal(held, pristine[_key(model, layer)].reshape(-1)[layer.adapters[name].indices])
    # A save of an adapter that holds no W0 reads it from the restored weight: the same file as while active.
    randmask.save_adapter(model, tmp_path / "c_inactive", adapter_name="c")
    for file in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "c_inactive" / file).read_bytes() == (tmp_path / "c_active" / file).read_bytes()
    with randmask.disable_adapter(model):
        assert all(torch.equal(p, pristine[n]) for n, p in _base_state(model).items())
    unloaded = randmask.unload(model)
    assert all(torch.equal(p, pristine[n]) for n, p in unloaded.state_dict().items())  # W0 back, bit for bit


def _key(model, layer) -> str:
    name = next(n for n, m in model.named_modules() if m is layer)
    return f"{name}.weight"


def _base_state(model) -> dict[str, torch.Tensor]:
    """The model's parameters under the names of the unwrapped model (randmask's values and layer state left out)."""
    return {n.replace(".base_layer", ""): p for n, p in model.state_dict().items()
            if ".adapters." not in n and not n.endswith("._extra_state")}


def test_peft_only_the_live_adapter_holds_its_w0():
    pytest.importorskip("peft")
    from peft import get_peft_model

    from randmask.peft import RandMaskConfig, RandMaskLayer

    pristine = {n: p.detach().clone() for n, p in tiny_model("llama").state_dict().items()}
    model = get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.3, seed=0), adapter_name="x")
    model.add_adapter("y", RandMaskConfig(density=0.3, seed=1))
    layers = [m for m in model.modules() if isinstance(m, RandMaskLayer)]
    with torch.no_grad():
        for layer in layers:
            for adapter in layer.randmask_adapters.values():
                adapter.values.normal_()
    for name in ["y", "x", "y"]:
        model.set_adapter(name)
        assert all(_held(layer.randmask_adapters) == {name} for layer in layers)
    model.eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, adapter_names=["x", "y"])  # a mixed batch: W0 in every weight, no adapter holds it
    assert all(_held(layer.randmask_adapters) == set() for layer in layers)
    model(input_ids=ids)  # the live adapter again
    assert all(_held(layer.randmask_adapters) == {"y"} for layer in layers)
    unloaded = model.unload()
    assert all(torch.equal(p, pristine[n]) for n, p in unloaded.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_indices_are_int32_and_int64_beyond_it_alike(arch, monkeypatch, tmp_path):
    """int32 indices (4 B per entry less) switch, train and save as int64 ones do, bit for bit."""
    results = []
    for wide in (False, True):  # True: every matrix is "too large" for int32 (the CSR layouts keep theirs)
        if wide:
            monkeypatch.setattr(randmask.adapter, "index_dtype", lambda largest: torch.int64)
        model = _two(arch)
        want = torch.int64 if wide else torch.int32
        assert all(a.indices.dtype == want for layer in randmask.masked_layers(model).values()
                   for a in layer.adapters.values())
        randmask.set_adapter(model, "a")
        randmask.set_adapter(model, "b")  # the trainable one (apply_masking froze "a")
        train_steps(model, tiny_inputs(arch), steps=2)
        randmask.set_adapter(model, "a")
        randmask.save_adapter(model, tmp_path / f"b{wide}", adapter_name="b")
        results.append((model_output(model, tiny_inputs(arch)), (tmp_path / f"b{wide}" / "adapter.safetensors")
                        .read_bytes(), {n: p.detach().clone() for n, p in randmask.unload(model).state_dict().items()}))
    (out32, file32, weights32), (out64, file64, weights64) = results
    assert torch.equal(out32, out64) and file32 == file64
    assert all(torch.equal(weights32[n], weights64[n]) for n in weights32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_delete_adapter_frees_it_and_leaves_the_others_as_they_were(arch):
    """As PEFT's delete_adapter: an inactive one goes without changing the output; the active one hands over to the
    first remaining (with a warning); the last one leaves the pristine base model. Its memory is freed."""
    import gc
    import weakref

    inputs = tiny_inputs(arch)
    pristine = {n: p.detach().clone() for n, p in tiny_model(arch).state_dict().items()}
    model = _two(arch)
    apply_masking(model, MaskingConfig(density=0.3, seed=5), adapter_name="c")  # overlaps a and b
    with torch.no_grad():
        for layer in randmask.masked_layers(model).values():
            layer.adapters["c"].values.normal_()
    outputs = {}
    for name in ("a", "b", "c"):
        randmask.set_adapter(model, name)
        outputs[name] = model_output(model, inputs)
    randmask.set_adapter(model, "b")
    gone = [weakref.ref(layer.adapters["a"]) for layer in randmask.masked_layers(model).values()]
    randmask.delete_adapter(model, "a")  # inactive
    gc.collect()
    assert randmask.adapter_names(model) == ["b", "c"] and all(ref() is None for ref in gone)
    assert torch.equal(model_output(model, inputs), outputs["b"])
    with pytest.warns(UserWarning, match="'b' was active and is deleted; 'c' is active now"):
        randmask.delete_adapter(model, "b")
    assert torch.equal(model_output(model, inputs), outputs["c"])
    with pytest.raises(randmask.MaskingError, match="no randmask adapter 'b'; it has \\['c'\\]"):
        randmask.delete_adapter(model, "b")
    with randmask.mixed_batch(model.eval(), ["c", randmask.BASE_ADAPTER]):
        with pytest.raises(randmask.MaskingError, match="inside mixed_batch"):
            randmask.delete_adapter(model, "c")
    randmask.delete_adapter(model, "c")  # the last one: the base model again, bit for bit
    assert not randmask.masked_layers(model) and randmask.adapter_names(model) == []
    assert all(torch.equal(p, pristine[n]) for n, p in model.state_dict().items())


def test_set_adapter_makes_the_active_adapters_values_the_trainable_ones_as_peft_does():
    """Adding "b" froze "a", and set_adapter("a") left it frozen: training "a" on failed in torch's words, or, beside
    another trainable parameter, left a's values unchanged, silently."""
    model = tiny_model("llama")
    apply_masking(model, MaskingConfig(density=0.1, seed=0), "a")
    apply_masking(model, MaskingConfig(density=0.1, seed=1, targets=["q_proj"]), "b")

    def trainable():
        return {name for layer in randmask.masked_layers(model).values() for name, adapter in layer.adapters.items()
                if adapter.values.requires_grad}

    assert trainable() == {"b"}  # the adapter added last is the one trained
    randmask.set_adapter(model, "a")
    assert trainable() == {"a"}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model.train(), tiny_inputs("llama"), steps=2)
    assert before and all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    randmask.set_adapter(model, "a", inference_mode=True)
    assert trainable() == set()
    with pytest.raises(randmask.MaskingError, match="inference_mode must be True or False"):
        randmask.set_adapter(model, "a", inference_mode="no")
