"""The benchmark's model, variants, precisions and training step (shared by the timing and memory phases).

Variants: the floor (frozen model; the backward stops at the outputs of layer 0's q/k/v projections,
the first adapted layers, so it is the work every adapted variant must do), full fine-tuning, PEFT
LoRA r=8 and SHiRA (LoRA r=8's count) on q/v and on all linear layers, randmask at 0.1%, 0.01%,
0.001% of all parameters on q/v and 1% on all linear layers.

Precisions: fp32; bf16-mixed (fp32 weights and trainable state, forward under CPU bf16 autocast);
bf16-true (bf16 frozen base, fp32 trainable state; full fine-tuning is left out: it has no frozen base).

--quantize (the runner's schemes: nf4, fp4, int8, ao-int8): every linear layer but the LM head stored
quantized, loaded through transformers' quantization_config as a QLoRA user would, computing in the
precision's weight dtype; full fine-tuning is left out (the base is frozen), LoRA is then QLoRA.
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

QV = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FLOOR_TARGETS = ["q_proj", "k_proj", "v_proj"]  # layer 0's: the first adapted layers of every scope
PRECISIONS = ("fp32", "bf16-mixed", "bf16-true")
RANDMASK_RATIOS = {"q/v": (1e-3, 1e-4, 1e-5), "all-linear": (1e-2,)}


def variant_names(precision: str, quantize: str = "none") -> list[str]:
    """All variants benchmarked at this precision, floor first."""
    names = ["floor"] + ([] if precision == "bf16-true" or quantize != "none" else ["full"])
    for scope in ("q/v", "all-linear"):
        names += [f"lora r=8 {scope}", f"shira r=8 {scope}"]
        names += [f"randmask {100 * r:g}% {scope}" for r in RANDMASK_RATIOS[scope]]
    return names


def scope_of(name: str) -> str:
    return "all-linear" if name.endswith("all-linear") else "q/v"


# OPT shapes: (hidden, layers, ffn, heads, vocab, positions). "quick" is --quick; "tiny" is benchmarks/gpu's --dry-run.
SHAPES = {
    "tiny": (64, 2, 256, 4, 32768, 128),  # the vocabulary makes 1e-5 of all parameters ~5 entries per q/v matrix
    "quick": (256, 4, 1024, 4, 8192, 128),
    "opt-125m": (768, 12, 3072, 12, 50272, 2048),  # facebook/opt-125m
    "opt-1.3b": (2048, 24, 8192, 32, 50272, 2048),  # facebook/opt-1.3b
}


def build_base(quick: bool, precision: str, shape: str | None = None, device: str = "cpu",
               quantize: str = "none") -> torch.nn.Module:
    """OPT-125m's shapes (random init, seed 0), a 4x256 model with --quick, or ``shape`` (a key of SHAPES);
    bf16 for bf16-true; on ``device``; stored quantized under ``quantize``."""
    import transformers

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
    hidden, layers, ffn, heads, vocab, positions = SHAPES[shape or ("quick" if quick else "opt-125m")]
    cfg = transformers.OPTConfig(hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
                                 vocab_size=vocab, max_position_embeddings=positions, word_embed_proj_dim=hidden)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1.3b model's CPU init would take most of a minute
        model = transformers.OPTForCausalLM(cfg).eval()  # eval: no dropout, the same math for every variant
    model = model.to(torch.bfloat16) if precision == "bf16-true" else model
    return model if quantize == "none" else quantized_copy(model, quantize)


def quantized_copy(model: torch.nn.Module, quantize: str) -> torch.nn.Module:
    """``model`` reloaded with the runner's ``--quantize`` scheme (saved to a temporary folder first)."""
    import transformers

    from randmask_lab.experiment.compute.quantize import quantization_config

    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        config = quantization_config(quantize, dtype, torch.device("cpu"))
        return transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=config,
                                                                 device_map={"": "cpu"}).eval()


def batch_ids(model: torch.nn.Module, quick: bool, batch: tuple[int, int] | None = None) -> torch.Tensor:
    """(batch, seq) token ids on the model's device: 4 x 64 with --quick, else 8 x 128, or ``batch``."""
    batch, seq = batch or ((4, 64) if quick else (8, 128))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return ids.to(next(model.parameters()).device)


def make_variant(name: str, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` (modified in place: pass a copy to keep it) with exactly this variant's parameters trainable."""
    from peft import LoraConfig, ShiraConfig, get_peft_model

    from randmask import MaskingConfig, apply_masking

    if name == "floor":
        return base.requires_grad_(False)
    if name == "full":
        return base.requires_grad_(True)
    targets = ALL_LINEAR if scope_of(name) == "all-linear" else QV
    if name.startswith("lora"):
        return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    if name.startswith("shira"):
        return get_peft_model(base, ShiraConfig(r=8, target_modules=targets))
    if name.startswith("randmask"):
        ratio = float(name.split()[1].rstrip("%")) / 100
        return apply_masking(base.requires_grad_(False),
                             MaskingConfig(targets=targets, trainable_ratio=ratio, seed=0))
    raise ValueError(f"unknown variant {name!r}")


def make_all(base: torch.nn.Module, precision: str, only: list[str] | None = None,
             quantize: str = "none") -> dict[str, torch.nn.Module]:
    """Every variant at this precision (or the floor, each scope's LoRA and the ones in ``only``)."""
    names = variant_names(precision, quantize)
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown variants {unknown} at {precision}; known: {names}")
        keep = {"floor", "lora r=8 q/v", "lora r=8 all-linear", *only}  # the ratios' references
        names = [n for n in names if n in keep]
    return {name: make_variant(name, copy.deepcopy(base)) for name in names}


def _floor_hooks(model: torch.nn.Module) -> list:
    """Make the outputs of layer 0's q/k/v projections require grad: the backward stops there."""

    def hook(_module, _inputs, output):
        return output.requires_grad_()  # a leaf: nothing upstream of it requires grad

    layer0 = model.model.decoder.layers[0].self_attn
    return [getattr(layer0, t).register_forward_hook(hook) for t in FLOOR_TARGETS]


def make_step(name: str, model: torch.nn.Module, ids: torch.Tensor, precision: str
              ) -> tuple[Callable[[], None], torch.optim.Optimizer | None, dict]:
    """A closure running one training step, its optimizer, and a dict that records grad bytes."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    if name == "floor":
        _floor_hooks(model)
    record = {"grad_bytes": 0}

    device = ids.device.type

    def step() -> None:
        autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16-mixed"
                    else contextlib.nullcontext())
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            record["grad_bytes"] = sum(p.grad.nbytes for p in params if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()  # the caller times the step: wait for the GPU to finish it

    return step, opt, record


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's per-parameter tensors (AdamW: exp_avg, exp_avg_sq; not the step scalars)."""
    if opt is None:
        return 0
    return sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def adapter_bytes(name: str, model: torch.nn.Module) -> int:
    """Bytes on disk of what a user would save: the adapter file(s), or all weights for full fine-tuning."""
    if name == "floor":
        return 0
    if name == "full":
        return sum(p.nbytes for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        if name.startswith("randmask"):
            from randmask import save_adapter

            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
