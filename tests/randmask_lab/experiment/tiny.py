"""Tiny model folders (a Llama and a BERT, hidden 32) with real tokenizers, built in seconds."""

from __future__ import annotations

import string
from pathlib import Path

import torch

CORPUS = [
    "The cat sat on the mat. Does this mean that the cat is happy? Yes or No?",
    "It was great. It was terrible. Yes No Maybe true false because so",
    "A man went to the market to buy some bread and milk for his family.",
    "Title: Context: Question: Answer: Passage: the 1990s, 2001 and 42 people.",
] * 4


def make_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a byte-level BPE tokenizer (~300 tokens) saved in ``folder``."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT (hidden 32) with a character-level WordPiece vocabulary saved in ``folder``."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    tok = tf.BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=0)
    tf.BertModel(cfg).save_pretrained(folder)
    return folder
