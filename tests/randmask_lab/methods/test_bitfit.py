"""BitFit: projection and norm biases (zero biases added where the architecture has none)."""

import pytest
import torch

from randmask_lab.methods import prepare_method

from .tiny import FFN, HEAD, KV, D, build, logits

NORM_BIASES = {"opt": 5 * D, "gpt2": 5 * D, "bert": 5 * D, "llama": 0, "gemma3": 0}
PROJ_BIASES = {  # per layer: attention projections' out dims + MLP projections' out dims
    "opt": 4 * D + FFN + D,
    "gpt2": 3 * D + D + 4 * D + D,
    "bert": 4 * D + FFN + D,
    "llama": D + KV + KV + D + FFN + FFN + D,
    "gemma3": D + KV + KV + D + FFN + FFN + D,
}


@pytest.mark.parametrize("arch", list(PROJ_BIASES))
def test_count_and_identity_at_init(arch: str) -> None:
    model = build(arch)
    before = logits(model, arch)
    report = prepare_method("bitfit", model).report
    added = arch in ("llama", "gemma3")
    assert report.groups.get("added_bias" if added else "bias") == 2 * PROJ_BIASES[arch]
    assert report.groups.get("norm_bias", 0) == NORM_BIASES[arch]
    assert report.groups.get("head", 0) == (HEAD if arch == "bert" else 0)
    assert report.trainable == sum(report.groups.values())
    torch.testing.assert_close(logits(model, arch), before)


def test_rmsnorm_without_bias_is_reported() -> None:
    notes = " ".join(prepare_method("bitfit", build("llama")).report.notes)
    assert "5/5 norm layers have no bias (LlamaRMSNorm)" in notes
    assert "added 14 zero-initialised projection biases" in notes


def test_only_biases_train() -> None:
    prepared = prepare_method("bitfit", build("opt"))
    names = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".bias") for n in names)
