"""Merging sparse adapters: each method's rule on overlapping entries, and add_weighted_adapter on a model."""

import numpy as np
import pytest
import torch
from tests.conftest import tiny_model

import randmask
from randmask import MaskingConfig, MaskingError, add_weighted_adapter, apply_masking, load_adapter, save_adapter
from randmask.merge import merge_sparse


def _dense(indices, values, n):
    out = torch.zeros(n, dtype=torch.float64)
    out[indices] = values.double()
    return out


def _deltas(n=400, sizes=(60, 80, 50), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randperm(n, generator=gen)[:k].sort().values, torch.randn(k, generator=gen)) for k in sizes]


def test_linear_merge_is_the_weighted_sum_of_the_deltas():
    deltas, weights = _deltas(), [1.0, -0.5, 2.0]
    union, merged = merge_sparse(deltas, weights, "linear")
    expected = sum(w * _dense(i, v, 400) for (i, v), w in zip(deltas, weights))
    torch.testing.assert_close(_dense(union, merged, 400), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(union, torch.unique(torch.cat([i for i, _ in deltas])))


def test_ties_equals_peft_ties_where_the_masks_coincide():
    """Identical masks: a share of an adapter's entries is a share of the tensor, so PEFT's dense rule applies as is."""
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    gen = torch.Generator().manual_seed(1)
    idx = torch.arange(0, 300, 3)
    deltas = [(idx, torch.randn(idx.numel(), generator=gen)) for _ in range(3)]
    weights = [1.0, 0.7, 1.3]
    for method in ("total", "frequency"):
        _, ours = merge_sparse(deltas, weights, "ties", density=0.4, majority_sign_method=method)
        theirs = merge_utils.ties([v for _, v in deltas], torch.tensor(weights), 0.4, method)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_each_method_resolves_an_overlapping_entry_by_its_own_rule():
    idx = torch.tensor([0, 5])  # entry 5 is in both masks, entry 0 and 7 in one each
    a, b = (idx, torch.tensor([1.0, 3.0])), (torch.tensor([5, 7]), torch.tensor([-1.0, 2.0]))
    _, lin = merge_sparse([a, b], [1.0, 1.0], "linear")
    assert lin.tolist() == [1.0, 2.0, 2.0]  # union [0, 5, 7]: overlaps add
    _, ties = merge_sparse([a, b], [1.0, 1.0], "ties", density=1.0)
    assert ties.tolist() == [1.0, 3.0, 2.0]  # sign of 3 + (-1) is +: only the agreeing 3 is kept (mean of one)
    _, same = merge_sparse([a, (torch.tensor([5, 7]), torch.tensor([1.0, 2.0]))], [1.0, 1.0], "ties", density=1.0)
    assert same.tolist() == [1.0, 2.0, 2.0]  # both positive at 5: their mean
    _, dare = merge_sparse([a, b], [1.0, 1.0], "dare_linear", density=1.0)
    assert dare.tolist() == lin.tolist()  # density 1 drops nothing


def test_dare_drops_with_the_given_density_and_rescales():
    gen = torch.Generator().manual_seed(0)
    idx, values = torch.arange(20000), torch.ones(20000)
    _, out = merge_sparse([(idx, values)], [1.0], "dare_linear", density=0.25, generator=gen)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.all(out[kept] == 4.0)  # 1 / density
    _, again = merge_sparse([(idx, values)], [1.0], "dare_linear", density=0.25,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded


def test_bad_merge_arguments_are_refused():
    deltas = _deltas()
    for kwargs, match in [({"combination_type": "svd"}, "svd/cat"), ({"combination_type": "ties"}, "needs density"),
                          ({"density": 0.5}, "no effect"), ({"majority_sign_method": "frequency"}, "applies to ties"),
                          ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "x"}, "total")]:
        with pytest.raises(MaskingError, match=match):
            merge_sparse(deltas, [1.0] * 3, **kwargs)
    with pytest.raises(MaskingError, match="one weight per adapter"):
        merge_sparse(deltas, [1.0], "linear")
    for bad in ([1.0, float("nan"), 1.0], [1.0, "2", 1.0], [1.0, torch.ones(2), 1.0], [1.0, True, 1.0],
                [1.0, np.float64("inf"), 1.0]):
        with pytest.raises(MaskingError, match="must be finite real numbers"):
            merge_sparse(deltas, bad, "linear")


def test_numpy_and_torch_scalar_weights_merge_as_floats():
    deltas = _deltas()
    expected = merge_sparse(deltas, [1.0, -0.5, 2.0], "linear")
    for weights in ([np.float32(1.0), np.float64(-0.5), np.int64(2)], torch.tensor([1.0, -0.5, 2.0]),
                    [torch.tensor(1.0), torch.tensor([-0.5]), 2]):
        union, merged = merge_sparse(deltas, weights, "linear")
        assert torch.equal(union, expected[0]) and torch.equal(merged, expected[1])


def _two_adapter_model(arch, density=0.3):
    model = tiny_model(arch)
    gen = torch.Generator().manual_seed(0)
    for seed, name in enumerate(["a", "b"]):
        apply_masking(model, MaskingConfig(density=density, seed=seed), adapter_name=name)
        with torch.no_grad():
            for layer in randmask.masked_layers(model).values():
                layer.adapters[name].values.copy_(torch.randn(layer.adapters[name].nnz, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_add_weighted_adapter_linear_is_the_sum_of_the_deltas_in_the_model(arch, tmp_path):
    model = _two_adapter_model(arch)
    randmask.set_adapter(model, "a")
    add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "ab")
    assert all(layer.active_adapter == "a" for layer in randmask.masked_layers(model).values())  # not switched
    ids = torch.randint(0, 128, (2, 7))
    randmask.set_adapter(model, "ab")
    with torch.no_grad():
        merged_out = model(ids).logits
    # Reference: the pristine weights plus the dense sum of the two deltas.
    reference = tiny_model(arch)
    with torch.no_grad():
        for name, layer in randmask.masked_layers(model).items():
            delta = torch.zeros(layer.weight.numel())
            for adapter, w in (("a", 1.0), ("b", 0.5)):
                delta[layer.adapters[adapter].indices] += w * layer.adapters[adapter].values
            reference.get_submodule(name).weight.view(-1).add_(delta)
        torch.testing.assert_close(merged_out, reference(ids).logits, atol=1e-5, rtol=0)
    save_adapter(model, tmp_path, "ab")  # a custom-mask adapter: its union indices are saved
    reloaded = load_adapter(tiny_model(arch), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged_out)


def test_add_weighted_adapter_refuses_what_it_cannot_do():
    model = _two_adapter_model("llama")
    with pytest.raises(MaskingError, match="no adapters"):
        add_weighted_adapter(model, ["a", "zz"], [1.0, 1.0], "m")
    with pytest.raises(MaskingError, match="already exists"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "b")
    with pytest.raises(MaskingError, match="needs density"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", combination_type="dare_ties")
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", combination_type="dare_ties", density=0.5)
    assert randmask.masking_summary(model, "m").trainable > randmask.masking_summary(model, "a").trainable


def test_disjoint_partition_masks_never_share_an_entry_and_reload(tmp_path):
    model = tiny_model("llama")
    for k in range(4):
        apply_masking(model, MaskingConfig(density=0.05, seed=3, partition=(k, 4)), adapter_name=f"p{k}")
    apply_masking(model, MaskingConfig(density=0.05, seed=3), adapter_name="plain")
    for layer in randmask.masked_layers(model).values():
        parts = torch.cat([layer.adapters[f"p{k}"].indices for k in range(4)])
        assert torch.unique(parts).numel() == parts.numel()
        counts = [layer.adapters[f"p{k}"].nnz for k in range(4)]
        assert max(counts) - min(counts) <= 1  # a near-equal split of one draw at 4x the density
    plain = randmask.masking_summary(model, "plain").trainable
    assert abs(randmask.masking_summary(model, "p1").trainable - plain) < 0.25 * plain
    save_adapter(model, tmp_path, "p2")
    reloaded = load_adapter(tiny_model("llama"), tmp_path)
    for name, layer in randmask.masked_layers(reloaded).items():
        assert torch.equal(layer.adapters["default"].indices,
                           randmask.masked_layers(model)[name].adapters["p2"].indices)


def test_a_bad_partition_is_refused():
    for partition, match in [((4, 4), "0 <= k < n"), ((0, 1), "n >= 2"), ("0/4", "must be")]:
        with pytest.raises(MaskingError, match=match):
            MaskingConfig(density=0.1, partition=partition)
    with pytest.raises(MaskingError, match="splits random masks"):
        MaskingConfig(density=0.1, partition=(0, 2), mask_kind="structured")
    with pytest.raises(MaskingError, match="more than all of it"):
        apply_masking(tiny_model("llama"), MaskingConfig(density=0.3, partition=(0, 4)))


@pytest.mark.parametrize("device", ["cpu", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))])
@pytest.mark.parametrize("combination_type", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_merge_sparse_runs_on_the_deltas_device_and_draws_the_same_drops(device, combination_type):
    """The weights column and DARE's drop mask were made on the CPU, so a merge of CUDA deltas mixed devices (a
    traceback on both APIs' add_weighted_adapter); the drops are drawn on the CPU generator, the same on any device."""
    idx = [torch.tensor([0, 2, 5, 7]), torch.tensor([1, 2, 7, 9])]
    vals = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([0.25, 2.0, -1.0, 4.0])]
    density = None if combination_type == "linear" else 0.5
    results = {}
    for where in ("cpu", device):
        deltas = [(i.to(where), v.to(where)) for i, v in zip(idx, vals)]
        union, merged = merge_sparse(deltas, [0.5, 2.0], combination_type, density,
                                     generator=torch.Generator().manual_seed(0))
        assert union.device.type == merged.device.type == torch.device(where).type
        results[where] = (union.cpu(), merged.cpu())
    assert torch.equal(results["cpu"][0], results[device][0])
    torch.testing.assert_close(results["cpu"][1], results[device][1])


def test_a_merge_over_overlapping_blocks_counts_each_entry_once_and_reloads(tmp_path):
    """One adapter masks GPT-2's whole c_attn, the other its [q] block: the merge's blocks were both spans, which
    overlap, so the summary counted the q entries twice (2310 of 1556) and its saved file was refused as edited."""
    model = tiny_model("gpt2")
    apply_masking(model, MaskingConfig(targets=["c_attn"], density=0.2), adapter_name="a")
    apply_masking(model, MaskingConfig(targets=["c_attn[q]"], density=0.2, seed=1), adapter_name="b")
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab")
    layers = randmask.masked_layers(model).values()
    assert randmask.masking_summary(model, "ab").trainable == sum(layer.adapters["ab"].nnz for layer in layers)
    assert all([(b.name, b.start, b.stop) for b in layer.adapters["ab"].blocks] == [("", 0, 96)] for layer in layers)
    randmask.set_adapter(model, "ab")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        merged_out = model(ids).logits
    save_adapter(model, tmp_path, "ab")
    with torch.no_grad():
        assert torch.equal(load_adapter(tiny_model("gpt2"), tmp_path)(ids).logits, merged_out)


def test_a_merged_block_named_two_ways_gets_one_name_whatever_the_hash_seed():
    """Two sources naming one row range differently ("q", "query"): the set of spans was sorted by position only,
    so the saved name followed PYTHONHASHSEED (q, query, query at seeds 1, 4, 6); the name now breaks the tie."""
    import os
    import subprocess
    import sys

    code = ("import torch; from types import SimpleNamespace as S; from randmask.adapter import Block; "
            "from randmask.merge import union_blocks; "
            "src = lambda n: S(blocks=[Block(n, 0, 4, 2)], stored_shape=(8, 3), transposed=False); "
            "print(union_blocks([src('query'), src('q')], torch.tensor([0, 5, 13]))[0].name)")
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "4", "6")}
    assert names == {"q"}
