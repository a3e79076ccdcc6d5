"""torch.compile of a randmask model: one graph, the eager op's numbers (randmask.compiled)."""

import weakref

import pytest
import torch
from tests.conftest import tiny_inputs, tiny_model, train_steps
from torch._dynamo.testing import CompileCounterWithBackend

from randmask import MaskingConfig, apply_masking, masked_layers, mixed_batch
from randmask.compiled import delta_matmul_op, sddmm_op
from randmask.delta import delta_matmul
from randmask.ops import SparsePattern, sddmm

ARCHS = ["llama", "gpt2"]  # nn.Linear and GPT-2's transposed Conv1D


def _masked(arch: str, path: str = "model") -> torch.nn.Module:
    """A tiny model with q and v masked, by ``apply_masking`` or as a PEFT model (``get_peft_model``)."""
    if path == "peft":
        peft = pytest.importorskip("peft")
        from randmask.peft import RandMaskConfig

        return peft.get_peft_model(tiny_model(arch), RandMaskConfig(density=0.05, seed=1))
    model = tiny_model(arch)
    apply_masking(model, MaskingConfig(density=0.05, seed=1))
    return model


@pytest.mark.parametrize("path", ["model", "peft"])
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_training_is_one_graph_and_matches_eager_training(arch: str, path: str) -> None:
    """AOTAutograd (the aot_eager backend: no C++ compiler needed) runs the traced forward and backward. Before
    randmask.compiled, each masked layer broke the graph 4-5 times (19 graphs, not 1, for 2 Llama layers); the
    PEFT layer's stale-weight compare broke it at every masked layer too (19 graphs)."""
    torch._dynamo.reset()
    eager, compiled = _masked(arch, path), _masked(arch, path)
    inputs = tiny_inputs(arch)
    eager_losses = train_steps(eager, inputs)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_losses = train_steps(torch.compile(compiled, backend=counter), inputs)
    plain = torch._dynamo.explain(tiny_model(arch))(**inputs).graph_count  # GPT-2's own loss breaks once
    assert counter.frame_count == plain  # masking adds no graph, and nothing recompiles over the three steps
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-6)
    assert compiled_losses[-1] < compiled_losses[0]  # it trained...
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:  # ...the same adapter values, and its weights hold them for an eager forward
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        ids = {k: v for k, v in inputs.items() if k != "labels"}
        torch.testing.assert_close(compiled(**ids).logits, eager(**ids).logits, rtol=1e-5, atol=1e-6)


def test_compiled_autocast_matches_eager_autocast() -> None:
    """Under bf16 autocast both ops run the matmuls and the SDDMM on the bf16 casts (fp32 sums)."""
    torch._dynamo.reset()
    eager, compiled = _masked("llama"), _masked("llama")
    inputs = tiny_inputs("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager(**inputs).loss.backward()
        counter = CompileCounterWithBackend("aot_eager")
        torch.compile(compiled, backend=counter)(**inputs).loss.backward()
    assert counter.frame_count == 1  # autocast adds no graph break either
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:
            assert b.grad.dtype == a.grad.dtype == torch.float32
            torch.testing.assert_close(b.grad, a.grad, rtol=2e-2, atol=2e-4, msg=name)


@pytest.mark.slow
def test_inductor_training_matches_eager_training() -> None:
    """The default backend generates C++ (a compiler and a minute or two here)."""
    torch._dynamo.reset()
    eager, compiled = _masked("llama"), _masked("llama")
    inputs = tiny_inputs("llama")
    assert train_steps(torch.compile(compiled), inputs) == pytest.approx(train_steps(eager, inputs), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sddmm_op_is_the_eager_sddmm_and_passes_opcheck(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    g, x = torch.randn(12, 8, generator=gen, dtype=dtype), torch.randn(12, 6, generator=gen, dtype=dtype)
    indices = torch.randperm(48, generator=gen)[:10].sort().values
    out = sddmm_op(g, x, indices, 8, 6, False)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out, sddmm(g, x, SparsePattern(indices, (8, 6))).to(out.dtype))
    torch.library.opcheck(sddmm_op, (g, x, indices, 8, 6, False))  # schema, fake (shape-only) impl, dispatch


@pytest.mark.slow  # its eager op breaks the graph: ~20 graphs to compile, a minute or two here
def test_a_weight_gathered_anew_for_the_backward_takes_the_eager_op_under_compile() -> None:
    """FSDP2 frees its gathered weight after the forward; the eager op writes the delta again for the backward, so
    a compiled forward over such a weight runs it (a graph break) and gets the eager gradients."""
    torch._dynamo.reset()
    eager, compiled = _masked("llama"), _masked("llama")
    stand_in = torch.zeros(1)  # as FSDP2's all-gathered copy: not the parameter the adapter writes into
    for model in (eager, compiled):
        for layer in masked_layers(model).values():
            for adapter in layer.adapters.values():
                adapter._weight = weakref.ref(stand_in)
    inputs = tiny_inputs("llama")
    eager(**inputs).loss.backward()
    torch.compile(compiled, backend="aot_eager")(**inputs).loss.backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)



def test_a_layer_whose_weight_is_gone_traces_beside_it_without_a_break() -> None:
    """A copy (``copy.deepcopy``; FSDP2's ``fully_shard`` alike, ``test_fsdp2_compiled.py``) has lost the parameter
    its adapter writes into: compiled, each such layer adds the delta beside the weight as it is (``linear_beside``,
    here a weight holding stale entries), with no graph break, and the gradients are eager's."""
    import copy

    torch._dynamo.reset()
    eager = _masked("llama")
    with torch.no_grad():
        for layer in masked_layers(eager).values():
            layer.adapters["default"].values.normal_(std=0.1)
    compiled = copy.deepcopy(eager)
    assert all(a.weight_replaced() for layer in masked_layers(compiled).values() for a in layer.adapters.values())
    assert not any(a.weight_replaced() for layer in masked_layers(eager).values() for a in layer.adapters.values())
    with torch.no_grad():  # the copy's values move on: its weights now hold stale entries
        for model in (eager, compiled):
            for layer in masked_layers(model).values():
                layer.adapters["default"].values.add_(0.05)
    inputs = tiny_inputs("llama")
    eager(**inputs).loss.backward()
    assert torch._dynamo.explain(compiled)(**inputs).graph_break_count == 0
    torch._dynamo.reset()
    torch.compile(compiled, backend="aot_eager")(**inputs).loss.backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_compiled_peft_model_follows_switches_disabling_and_merges_as_eager_does() -> None:
    """PEFT's lifecycle between compiled calls changes Python state the traced forward read (which adapter is
    live, disabled, merged): Dynamo's guards must recompile, never replay a stale graph."""
    peft = pytest.importorskip("peft")
    from randmask.peft import RandMaskConfig

    torch._dynamo.reset()
    inputs = {k: v for k, v in tiny_inputs("llama").items() if k != "labels"}

    def two_adapters() -> torch.nn.Module:
        model = peft.get_peft_model(tiny_model("llama"), RandMaskConfig(density=0.05, seed=1))
        model.add_adapter("other", RandMaskConfig(density=0.05, seed=2))
        with torch.no_grad():
            for seed, (_, p) in enumerate(n for n in model.named_parameters() if "randmask_adapters" in n[0]):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
        return model

    eager, model = two_adapters(), two_adapters()
    compiled = torch.compile(model, backend="aot_eager")

    def same(what: str) -> None:
        with torch.no_grad():
            torch.testing.assert_close(compiled(**inputs).logits, eager(**inputs).logits, msg=what)

    same("default")
    for m in (eager, model):
        m.set_adapter("other")
    same("after set_adapter")
    with eager.disable_adapter(), model.disable_adapter():
        same("adapters disabled")
    same("enabled again")
    for m in (eager, model):
        m.merge_adapter()
    same("merged")
    for m in (eager, model):
        m.unmerge_adapter()
        m.set_adapter("default")
    same("unmerged, back to default")
    with torch.no_grad():
        plain = tiny_model("llama")(**inputs).logits
    assert not torch.allclose(compiled(**inputs).logits, plain)  # the adapters do change the output



@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_two_compiled_forwards_before_one_backward_get_eager_gradients(backend: str) -> None:
    """Two towers of one model (a sentence-embedding loss), or a chosen and a rejected pass: each compiled forward
    writes the weight again. Writing it in place (a custom op that declares the mutation, which saves inductor a
    copy of each masked weight per forward) made the second write fail the first backward's version check; the
    traced write is functionalized instead, and the backward reads the copy its own forward made."""
    torch._dynamo.reset()
    eager, compiled = _masked("llama"), _masked("llama")
    for model in (eager, compiled):
        with torch.no_grad():
            for seed, p in enumerate(p for p in model.parameters() if p.requires_grad):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) * 0.05)
    inputs = tiny_inputs("llama")
    (eager(**inputs).loss + eager(**inputs).loss).backward()
    run = torch.compile(compiled, backend=backend)
    (run(**inputs).loss + run(**inputs).loss).backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("scheme", ["nf4", "ao-int8", "ao-nf4"])  # bnb 4-bit, torchao tensor subclasses
def test_a_quantized_base_compiles_to_its_own_graphs_and_trains_as_eager(scheme: str, tmp_path) -> None:
    """The delta path (the weight cannot hold the entries): SpMM forward, its transpose for dL/dx and the SDDMM
    as custom ops. Before, the CSR layout's data-dependent Python broke the graph 36-40 times."""
    from tests.randmask.quantized_models import load_quantized, save_tiny_llama

    torch._dynamo.reset()
    folder = save_tiny_llama(tmp_path / "llama")
    inputs = tiny_inputs("llama")
    plain = torch._dynamo.explain(load_quantized(folder, scheme))(**inputs).graph_count
    eager, compiled = load_quantized(folder, scheme), load_quantized(folder, scheme)
    for model in (eager, compiled):
        apply_masking(model, MaskingConfig(targets=["q_proj", "v_proj"], density=0.2, seed=0))
    eager_losses = train_steps(eager, inputs)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_losses = train_steps(torch.compile(compiled, backend=counter), inputs)
    assert counter.frame_count == plain
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled_losses[-1] < compiled_losses[0]
    # atol: AdamW (lr 5e-2) divides by sqrt(v), so an entry whose gradient is tiny moves by lr x its relative fp32
    # rounding difference (on the AMD EPYC with AVX512, one NF4 entry of 188 differed by 1.7e-6 after 3 steps).
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-6, msg=name)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_delta_matmul_op_is_the_eager_spmm_and_passes_opcheck(transposed: bool, transpose: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    indices = torch.randperm(48, generator=gen)[:10].sort().values
    pattern = SparsePattern(indices, (8, 6), transposed)
    out_f, in_f = pattern.logical_shape
    dense = torch.randn(5, out_f if transpose else in_f, generator=gen)
    values = torch.randn(10, generator=gen)
    out = delta_matmul_op(dense, values, indices, 8, 6, transposed, transpose)
    torch.testing.assert_close(out, delta_matmul(dense, values, pattern, transpose))
    torch.library.opcheck(delta_matmul_op, (dense, values, indices, 8, 6, transposed, transpose))


def test_fullgraph_compiles_and_new_sequence_lengths_recompile_as_the_unadapted_model_does() -> None:
    """``fullgraph=True`` raises at any graph break; the custom ops' fake implementations read token counts
    symbolically, so lengths after the first compile one dynamic-shape graph, as for the model unadapted."""

    def frames(model: torch.nn.Module) -> int:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for length in (12, 20, 28):
            ids = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(length))
            compiled(input_ids=ids, labels=ids).loss.backward()
        return counter.frame_count

    assert frames(_masked("llama")) == frames(tiny_model("llama")) == 2


@pytest.mark.parametrize(("call", "message"), [
    (lambda i: delta_matmul_op(torch.randn(5, 6), torch.randn(3), i(1, 5, 1000), 8, 6, False, False),
     r"indices must lie in \[0, 8 \* 6\)"),
    (lambda i: delta_matmul_op(torch.randn(5, 6), torch.randn(3), i(5, 1, 7), 8, 6, False, False),
     "sorted and unique"),
    (lambda i: delta_matmul_op(torch.randn(5, 6), torch.randn(4), i(1, 5, 7), 8, 6, False, False),
     r"values has shape \(4,\), the pattern has 3 entries"),
    (lambda i: delta_matmul_op(torch.randn(5, 7), torch.randn(3), i(1, 5, 7), 8, 6, False, False),
     r"dense_2d must be 2-D with 6 columns, got shape \(5, 7\)"),
    (lambda i: sddmm_op(torch.randn(5, 8), torch.randn(4, 6), i(1, 5, 7), 8, 6, False), "5 rows, x_2d 4"),
    (lambda i: sddmm_op(torch.randn(5, 8), torch.randn(5, 6), i(1, 5, 48), 8, 6, False), "must lie in"),
])
def test_the_public_ops_refuse_operands_that_do_not_fit_their_pattern(call, message: str) -> None:
    """``torch.ops.randmask.*`` are reachable by anyone, and their kernels (a CSR built without invariant checks)
    trust the pattern: a bad call raises one line instead of reading out of bounds or returning garbage."""
    with pytest.raises(ValueError, match=message):
        call(lambda *entries: torch.tensor(entries))



def _mixed_setup(arch: str, path: str):
    """A tiny model with three adapters of random values (the third on the value projection only, where the model
    has one), their names, and ``run(call, model, ids, names)``: one mixed batch of ``model`` through ``call`` (the
    model itself, or its compiled wrapper)."""
    if path == "peft":
        pytest.importorskip("peft")
        from tests.randmask.test_peft_serving import NAMES, _peft

        return _peft(arch), NAMES, lambda call, model, ids, names: call(input_ids=ids, adapter_names=names).logits
    from tests.randmask.test_mixed import NAMES, _multi

    def run(call, model, ids, names):
        with mixed_batch(model, names):  # entered on the model, outside the compiled call, as a server would
            return call(input_ids=ids).logits

    return _multi(arch).eval(), NAMES, run


@pytest.mark.parametrize("layout", ["gathered", "grouped"])
@pytest.mark.parametrize("path", ["model", "peft"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batches_compile_once_for_every_mix_of_names_and_equal_eager(arch: str, path: str, layout: str,
                                                                           monkeypatch) -> None:
    """Before, a mixed batch broke a 2-layer Llama's graph 39 times (the per-batch block-diagonal CSR), and under
    PEFT every new list of names recompiled (Dynamo guarded the names). The traced layout reads only the model's
    adapters and a (rows,) slot tensor made outside the graph, so a new mix of names reuses the compiled graph;
    above the gathered limit ("grouped": the limit at 0) so do the grouped custom ops."""
    from randmask import mixed

    if layout == "grouped":
        monkeypatch.setattr(mixed, "TRACED_GATHERED_MAX_ELEMENTS", 0)
    torch._dynamo.reset()
    (model, (a, b, c), run), (eager, _, _) = _mixed_setup(arch, path), _mixed_setup(arch, path)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    mixes = [[b, "__base__", a, c, b], [a, a, b, b, c], [c] * 5, ["__base__"] * 5, [c, b, a, "__base__", a],
             [c, a, b]]  # the last: another batch size
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, names in enumerate(mixes):
            ids = torch.randint(1, 128, (len(names), 8), generator=gen)
            out = run(compiled, model, ids, names)
            torch.testing.assert_close(out, run(eager, eager, ids, names), atol=1e-5, rtol=0, msg=str(names))
            if i == 1:  # (under PEFT the first batch found an adapter live in the weights: one guard more)
                frames = counter.frame_count
                assert frames == (2 if path == "peft" else 1)
        assert counter.frame_count <= frames + 1  # three more mixes of names: no recompile; a new batch size: one
        assert not torch.equal(out[0], out[1])  # the adapters do change the output


def test_a_mixed_batch_is_one_graph_without_breaks() -> None:
    from tests.randmask.test_mixed import _multi

    torch._dynamo.reset()
    model = _multi("llama").eval()
    with torch.no_grad(), mixed_batch(model, ["a", "__base__", "c", "a", "b"]):
        explained = torch._dynamo.explain(model)(input_ids=torch.randint(1, 128, (5, 8)))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("scheme", ["nf4", "ao-int8"])
def test_mixed_batches_on_a_quantized_base_compile_once_and_equal_eager(scheme: str, tmp_path) -> None:
    from tests.randmask.quantized_models import load_quantized, save_tiny_llama

    torch._dynamo.reset()
    model = load_quantized(save_tiny_llama(tmp_path / "llama"), scheme).eval()
    gen = torch.Generator().manual_seed(0)
    for seed, name in enumerate(["a", "b"]):
        apply_masking(model, MaskingConfig(targets=["q_proj", "v_proj"], density=0.2, seed=seed), adapter_name=name)
    with torch.no_grad():
        for layer in masked_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.values.copy_(torch.randn(adapter.nnz, generator=gen) * 0.3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    for names in (["a", "__base__", "b"], ["b", "b", "a"], ["__base__", "a", "a"]):
        ids = torch.randint(1, 128, (3, 7), generator=gen)
        with torch.no_grad(), mixed_batch(model, names):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert counter.frame_count == 1


def test_generate_through_a_compiled_forward_serves_new_mixes_without_recompiling() -> None:
    """``model.forward = torch.compile(model.forward)``, then ``generate`` inside ``mixed_batch``: prefill and decode
    compile once each, and a new mix of names reuses them with eager's tokens."""
    from tests.randmask.test_mixed import _multi

    torch._dynamo.reset()
    model, eager = _multi("llama").eval(), _multi("llama").eval()
    counter = CompileCounterWithBackend("aot_eager")
    model.forward = torch.compile(model.forward, backend=counter)
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    for i, names in enumerate((["a", "b", "c"], ["c", "__base__", "a"], ["b", "b", "a"])):
        ids = torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(i))
        with torch.no_grad(), mixed_batch(model, names):
            tokens = model.generate(ids, **settings)
        with torch.no_grad(), mixed_batch(eager, names):
            assert torch.equal(tokens, eager.generate(ids, **settings)), names
        if i == 0:
            frames = counter.frame_count
    # prefill, the first decode step and the decode steps after it as one dynamic-length graph: no break in a layer
    # (the eager layouts broke each masked layer: dozens of frames)
    assert counter.frame_count == frames <= 3


def _over_the_gathered_limit(model, rows: int, tokens: int) -> int:
    """A TRACED_GATHERED_MAX_ELEMENTS under which every masked layer of ``model`` gathers one token per row and none
    gathers ``tokens`` per row: a prefill above the limit, its decode steps below."""
    widths = [max(a.nnz for a in layer.adapters.values()) for layer in masked_layers(model).values()]
    limit = rows * max(widths)
    assert rows * tokens * min(widths) > limit
    return limit


def test_above_the_gathered_limit_the_traced_layout_runs_each_adapter_on_its_own_rows(monkeypatch) -> None:
    """The traced layout's memory bound: above the limit no (rows, tokens, N) product and no tables, the eager
    layouts' values, and an adapter's inf never reaches a row that does not ask for it."""
    from tests.randmask.test_mixed import _multi

    from randmask import mixed

    model = _multi("llama").eval()
    names = ["a", "__base__", "c", "a", "b"]
    groups = mixed.group_rows(names).with_slots(["a", "b", "c"])
    (name, layer), *_ = [(n, m) for n, m in masked_layers(model).items() if "v_proj" in n]  # c targets v_proj only
    layer.restore_base()  # W0 in the weight, as in a mixed batch
    x = torch.randn(len(names), 6, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = mixed.mixed_forward(layer.base_layer, x, layer.adapters, groups)
        gathered = mixed.traced_mixed_forward(layer.base_layer, x, layer.adapters, groups)
        monkeypatch.setattr(mixed, "TRACED_GATHERED_MAX_ELEMENTS", 0)
        monkeypatch.setattr(mixed.IndexTables, "build", lambda *a, **k: pytest.fail("tables built above the limit"))
        per_slot = mixed.traced_mixed_forward(layer.base_layer, x, layer.adapters, groups)
        torch.testing.assert_close(per_slot, eager, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(gathered, eager, atol=1e-6, rtol=0, msg=name)
        layer.adapters["c"].values[0] = float("inf")
        y = mixed.traced_mixed_forward(layer.base_layer, x, layer.adapters, groups)
    served_by_c = torch.tensor([n == "c" for n in names])
    assert torch.isfinite(y[~served_by_c]).all()
    torch.testing.assert_close(y[~served_by_c], eager[~served_by_c], atol=1e-6, rtol=0)


def test_a_compiled_prefill_above_the_gathered_limit_is_one_graph_and_equals_eager(monkeypatch) -> None:
    """A long prefill under torch.compile (limit lowered so that 3 rows x 6 tokens cross it and decode steps do not):
    one graph without breaks, eager's gradients, and generate's tokens with its decode steps gathered."""
    from tests.randmask.test_mixed import _multi

    from randmask import mixed

    torch._dynamo.reset()
    names, ids = ["a", "__base__", "c"], torch.randint(1, 128, (3, 6), generator=torch.Generator().manual_seed(0))
    model, eager = _multi("llama").eval(), _multi("llama").eval()
    monkeypatch.setattr(mixed, "TRACED_GATHERED_MAX_ELEMENTS", _over_the_gathered_limit(model, 3, 6))
    with torch.no_grad(), mixed_batch(model, names):
        explained = torch._dynamo.explain(model)(input_ids=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    losses = []
    for net, forward in ((model, compiled), (eager, eager)):
        with mixed_batch(net, names):  # backward inside: on exit the active adapter goes back into the weights
            loss = forward(input_ids=ids).logits.float().square().mean()
            loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    for (name, layer), other in zip(masked_layers(model).items(), masked_layers(eager).values()):
        for adapter_name, adapter in layer.adapters.items():
            want = other.adapters[adapter_name].values.grad
            torch.testing.assert_close(adapter.values.grad, want, atol=1e-6, rtol=1e-5, msg=f"{name} {adapter_name}")
    assert counter.frame_count == 1
    model.forward = torch.compile(model.forward, backend=CompileCounterWithBackend("aot_eager"))
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        with mixed_batch(model, names):
            tokens = model.generate(ids, **settings)
        with mixed_batch(eager, names):
            assert torch.equal(tokens, eager.generate(ids, **settings))
