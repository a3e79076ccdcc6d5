"""Per-architecture module tables."""

import pytest
import torch

from randmask.methods import default_head_modules, default_targets, prepare_method
from randmask.methods.targets import arch_targets, match_modules

from .tiny import D, build


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("opt", ["q_proj", "v_proj"]), ("llama", ["q_proj", "v_proj"]), ("gemma3", ["q_proj", "v_proj"]),
     ("gpt2", ["c_attn"]), ("bert", ["query", "value"])],
)
def test_default_targets(arch: str, expected: list[str]) -> None:
    assert default_targets(build(arch)) == expected


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma3", "gpt2", "bert", "vit", "clip_vision"])
def test_tables_match_every_layer(arch: str) -> None:
    model, table = build(arch), arch_targets(build(arch))
    assert len(match_modules(model, table.attention_out)) == 2
    assert len(match_modules(model, table.mlp_out)) == 2
    n_attention = 2 if arch == "gpt2" else 4
    n_mlp = 3 if arch in ("llama", "gemma3") else 2
    assert len(match_modules(model, table.attention)) == 2 * n_attention
    assert len(match_modules(model, table.mlp)) == 2 * n_mlp


@pytest.mark.parametrize("arch", ["vit", "clip_vision"])
def test_vision_models(arch: str) -> None:
    head = D * 3 + 3 if arch == "vit" else 0  # ViT's fresh 3-way classifier
    pixels = torch.randn(2, 3, 16, 16)
    for name, group, expected in [("lora", "lora", 2 * 2 * 8 * 2 * D), ("adapter", "adapter", 4 * 552)]:
        model = build(arch)
        with torch.no_grad():
            before = model(pixel_values=pixels)[0]
        prepared = prepare_method(name, model)
        assert prepared.report.groups == ({group: expected, "head": head} if head else {group: expected})
        with torch.no_grad():
            torch.testing.assert_close(prepared.model(pixel_values=pixels)[0], before)


def test_bert_mlp_output_is_not_attention_output() -> None:
    names = [n for n, _ in match_modules(build("bert"), arch_targets(build("bert")).mlp_out)]
    assert names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]


def test_default_heads() -> None:
    assert default_head_modules(build("bert")) == ["classifier", "pooler"]
    assert default_head_modules(build("opt")) == []


def test_unknown_architecture_says_what_to_do() -> None:
    model = build("opt")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"Pass targets=\[...\] explicitly"):
        default_targets(model)
