"""Tiny randomly initialised models (hidden 32, 2 layers) built from transformers configs."""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import nn

D, LAYERS, FFN, VOCAB = 32, 2, 64, 64
KV = 16  # Llama/Gemma3: 2 key/value heads of head_dim 8
HEAD = D * 2 + 2 + D * D + D  # BERT classifier (2 labels) + pooler
_TOKENS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}


def opt() -> nn.Module:
    cfg = tf.OPTConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, ffn_dim=FFN,
                       num_attention_heads=4, word_embed_proj_dim=D, max_position_embeddings=64, **_TOKENS)
    return tf.OPTForCausalLM(cfg)


def llama() -> nn.Module:
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=FFN,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_TOKENS)
    return tf.LlamaForCausalLM(cfg)


def gemma3() -> nn.Module:
    cfg = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                              intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=8, max_position_embeddings=64, **_TOKENS)
    return tf.Gemma3ForCausalLM(cfg)


def gpt2() -> nn.Module:
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=1)
    return tf.GPT2LMHeadModel(cfg)


def bert() -> nn.Module:
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, intermediate_size=FFN,
                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    return tf.BertForSequenceClassification(cfg)


def vit() -> nn.Module:
    cfg = tf.ViTConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=FFN,
                       image_size=16, patch_size=8, num_labels=3)
    return tf.ViTForImageClassification(cfg)


def clip_vision() -> nn.Module:
    cfg = tf.CLIPVisionConfig(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                              intermediate_size=FFN, image_size=16, patch_size=8)
    return tf.CLIPVisionModel(cfg)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "opt": opt, "llama": llama, "gemma3": gemma3, "gpt2": gpt2, "bert": bert, "vit": vit,
    "clip_vision": clip_vision,
}


def build(arch: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model of `arch` in eval mode, same weights for the same seed."""
    torch.manual_seed(seed)
    return MODELS[arch]().eval()


def batch(arch: str) -> dict[str, torch.Tensor]:
    """Inputs with labels: next-token labels for LMs, class labels for BERT."""
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1]) if arch == "bert" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model: nn.Module, arch: str) -> torch.Tensor:
    inputs = {k: v for k, v in batch(arch).items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits
