"""Tiny randomly initialised Llama / Qwen2 / Mistral / Qwen3 / Gemma3 models and a byte-level tokenizer, built in code."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

_CONFIGS: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig,
                                               "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig}
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer (4 specials + 256 bytes): any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_model(family: str, arch: dict[str, Any], seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a random ``family`` model from ``arch`` kwargs (seeded, so every call gives the same weights)."""
    tokenizer = byte_tokenizer()
    kwargs = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mistral":
        kwargs["sliding_window"] = None  # full attention: the tests compare against a dense reference
    kwargs.update(arch)
    config = _CONFIGS[family](**kwargs)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model, tokenizer
