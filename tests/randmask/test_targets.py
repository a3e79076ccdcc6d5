"""The one target resolver and its per-architecture tables."""

import dataclasses
import re

import pytest
import torch
from tests.conftest import TINY_ARCHS, tiny_model

from randmask import MaskingError, architecture_targets, default_targets, resolve_targets
from randmask.targets import ARCHITECTURES, TARGET_SETS, ArchitectureTargets, candidate_names

QV = {"opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn[q,v]"],
      "bert": ["query", "value"]}
PER_LAYER = {  # (attention, mlp) projections per layer
    "opt": (4, 2), "llama": (4, 3), "gpt2": (2, 2), "bert": (4, 2),
}


def test_target_sets_cover_the_table_fields() -> None:
    assert {f.name for f in dataclasses.fields(ArchitectureTargets)} | {"all_linear"} == set(TARGET_SETS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_default_qv(arch: str) -> None:
    assert default_targets(tiny_model(arch)) == QV[arch]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("which", TARGET_SETS)
def test_every_set_resolves_on_every_layer(arch: str, which: str) -> None:
    model = tiny_model(arch)
    targets = resolve_targets(model, default_targets(model, which))
    attention, mlp = PER_LAYER[arch]
    expected = {"qv": 2 if arch != "gpt2" else 1, "attention": attention, "mlp": mlp,
                "all_linear": attention + mlp, "attention_out": 1, "mlp_out": 1}[which]
    assert len(targets) == 2 * expected  # 2 layers
    assert len({t.name for t in targets}) == len(targets)


def test_gpt2_qv_is_the_q_and_v_blocks() -> None:
    (first, _) = resolve_targets(tiny_model("gpt2"))
    assert first.label == "transformer.h.0.attn.c_attn[q,v]"
    assert [(b[0], b[1], b[2]) for b in first.blocks] == [("q", 0, 32), ("v", 64, 96)]


def test_bert_mlp_output_is_not_attention_output() -> None:
    names = [t.name for t in resolve_targets(tiny_model("bert"), default_targets(tiny_model("bert"), "mlp_out"))]
    assert names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


def test_plain_string_is_a_suffix_and_bad_regex_is_clear() -> None:
    model = tiny_model("llama")
    assert [t.name for t in resolve_targets(model, "q_proj")] == [t.name for t in resolve_targets(model, ["q_proj"])]
    assert len(resolve_targets(model, r".*layers\.0\..*_proj")) == 7
    with pytest.raises(MaskingError, match="not a valid regular expression"):
        resolve_targets(model, "[")


def test_suffix_matches_whole_components() -> None:
    with pytest.raises(MaskingError, match="matches no module"):
        resolve_targets(tiny_model("llama"), ["_proj"])


@pytest.mark.parametrize("item", [".*", "q_proj|v_proj", "q*", ".q_proj", r"layers\.0"])
def test_a_regex_passed_as_a_list_item_is_named_as_one(item) -> None:
    pattern = rf"^target {re.escape(repr(item))} matches no module\..* never a regex: pass a regex as the whole targets"
    with pytest.raises(MaskingError, match=pattern):
        resolve_targets(tiny_model("llama"), [item])
    with pytest.raises(MaskingError, match=r"Use module-name suffixes, or a regex"):  # a plain typo: no such hint
        resolve_targets(tiny_model("llama"), ["layers.*.q_prj"])


def test_unknown_architecture_says_what_to_do() -> None:
    model = tiny_model("opt")
    model.config.model_type = "mystery"
    with pytest.raises(MaskingError, match=r"pass targets=\[...\]"):
        architecture_targets(model)
    assert "mystery" not in ARCHITECTURES


def test_exclude_leaves_modules_out_as_targets_name_them() -> None:
    model = tiny_model("llama")
    names = lambda targets: [t.name for t in targets]  # noqa: E731
    kept = names(resolve_targets(model, ["q_proj", "v_proj"], exclude=["layers.0.self_attn.q_proj"]))
    assert kept == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                    "model.layers.1.self_attn.v_proj"]
    assert names(resolve_targets(model, ["q_proj", "v_proj"], exclude="v_proj")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]  # a plain name is a suffix
    assert names(resolve_targets(model, ["q_proj", "v_proj"], exclude=r".*layers\.1\..*")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]  # any other string: a regex
    assert names(resolve_targets(model, ["q_proj"], exclude=["layers.*.mlp.up_proj", "layers.0.self_attn.q_proj"])) == [
        "model.layers.1.self_attn.q_proj"]  # an item that names a non-target is fine beside one that excludes


@pytest.mark.parametrize("exclude, match", [
    (["q_prj"], r"exclude item 'q_prj' matches no module of this model, so it would exclude nothing"),
    (["q_proj", "v_proj"], r"exclude \['q_proj', 'v_proj'\] leaves none of the 4 modules"),
    ("(", r"exclude='\(' is not a valid regular expression"),
    (r".*\.k_prj", r"exclude='.*\\\\.k_prj' matches no module of this model, so it would exclude nothing"),
    (["c_attn[q]"], r"exclude item 'c_attn\[q\]' names column blocks"),
    (["layers.0"], r"exclude \['layers.0'\] matches modules of this model \(model.layers.0\) but none of the 4 "
                   r"that targets .* a parent module does not exclude the modules inside it"),
    (["self_attn", "k_proj"], r"none of the 4 that targets"),
    (".*mlp.*", r"exclude '.\*mlp.\*' matches modules of this model \(model.layers.0.mlp, ...\) but none"),
])
def test_an_exclude_that_cannot_be_honoured_is_refused(exclude, match) -> None:
    with pytest.raises(MaskingError, match=match):
        resolve_targets(tiny_model("llama"), ["q_proj", "v_proj"], exclude=exclude)


@pytest.mark.parametrize("exclude", [5, [3], [""], "", {"q_proj": 1}])
def test_exclude_of_another_type_is_refused_by_the_config(exclude) -> None:
    from randmask import MaskingConfig

    with pytest.raises(MaskingError, match="exclude=.* must be a list of module-name suffixes or a regex string"):
        MaskingConfig(density=0.1, exclude=exclude)


@pytest.mark.parametrize("arch", ["opt", "llama", "gpt2", "bert"])
def test_all_linear_selects_what_peft_lora_selects(arch) -> None:
    """PEFT's shorthand ``target_modules="all-linear"``: every Linear / Conv1D but the output layer (the LM head, or a
    classification model's head), on any architecture; the same modules PEFT's LoRA adapts."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    ours = [t.name for t in resolve_targets(tiny_model(arch), "ALL-LINEAR")]  # PEFT lower-cases it too
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"  # tiny bert is a sequence classifier
    lora = get_peft_model(tiny_model(arch), LoraConfig(target_modules="all-linear", task_type=task))
    theirs = [n.removeprefix("base_model.model.") for n, m in lora.named_modules() if isinstance(m, LoraLayer)]
    assert ours == theirs and ours
    assert not any(n.endswith(("lm_head", "classifier")) for n in ours)


def test_multihead_attention_out_proj_is_refused_as_a_target_and_left_out_of_all_linear():
    """nn.MultiheadAttention reads out_proj.weight directly and never calls out_proj: masked, its values never
    trained and changed nothing (the output equalled the base's exactly with every value at 1.0)."""
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    with pytest.raises(MaskingError, match="out_proj of a torch.nn.MultiheadAttention"):
        resolve_targets(layer, ["self_attn.out_proj"])
    assert [t.name for t in resolve_targets(layer, "all-linear")] == ["linear1", "linear2"]
    assert "out_proj" not in candidate_names(layer)
