"""Shared fixtures: tiny randomly initialised transformers models of several architectures."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU, Triton kernels (randmask[gpu]) run in Triton's CPU interpreter. Set before triton is first
# imported: @triton.jit decides at decoration time whether it compiles or interprets.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("RANDMASK_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))

TINY_ARCHS = ["opt", "llama", "gpt2", "bert"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now: the rendezvous of one ``mp.spawn`` test's ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_spawned_rank(rank: int, port: int, world: int) -> None:
    """The first call of an ``mp.spawn`` worker: torchrun's environment for ``rank`` of ``world`` (what
    ``init_process_group`` and ``init_distributed`` read), and one thread per rank so the ranks share the cores."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def end_spawned_rank() -> None:
    """The last call of an ``mp.spawn`` worker, after it wrote its results: leave the process group and exit at
    once. The interpreter's teardown aborted about 1 run in 16 ("terminate called without an active exception",
    a C++ thread destroyed at exit), which ``mp.spawn`` reports as a failed rank."""
    import torch.distributed as dist

    dist.destroy_process_group()
    os._exit(0)


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-init model of ``arch`` (hidden 32, 2 layers), in eval mode (no dropout)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "opt":
        cfg = tf.OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=64, word_embed_proj_dim=32)
        model = tf.OPTForCausalLM(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                            vocab_size=128, max_position_embeddings=64, num_labels=2)
        model = tf.BertForSequenceClassification(cfg)
    elif arch == "vit":
        cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                           image_size=16, patch_size=8, num_labels=3)
        model = tf.ViTForImageClassification(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_inputs(arch: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs with a training loss for ``tiny_model(arch)``."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen),
                "labels": torch.randint(0, 3, (batch,), generator=gen)}
    ids = torch.randint(0, 128, (batch, seq), generator=gen)
    if arch == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def model_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits (no grad)."""
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits



def train_steps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], steps: int = 3,
                lr: float = 5e-2) -> list[float]:
    """``steps`` AdamW steps of the trainable parameters on one batch; the loss before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def hessian_vector_product(model: torch.nn.Module, inputs: dict[str, torch.Tensor], seed: int = 3) -> torch.Tensor:
    """H v of ``model(**inputs).loss`` w.r.t. its trainable parameters (flat), v drawn from ``seed``: double backward,
    as ``randmask hessian`` computes it, attention on the math SDPA kernel (the fused ones have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(model(**inputs).loss, params, create_graph=True)
        products = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector)), params)
    return torch.cat([p.reshape(-1) for p in products])


def trained(model: torch.nn.Module, arch: str, steps: int = 3, lr: float = 5e-2) -> torch.nn.Module:
    """``model`` after ``train_steps`` on ``tiny_inputs(arch)`` (so that its adapter values are not zero)."""
    train_steps(model, tiny_inputs(arch), steps, lr)
    return model

@pytest.fixture(params=TINY_ARCHS)
def arch(request) -> str:
    return request.param
