"""Load a causal LM + tokenizer from a ``model`` config node (see ``conf/model/*.yaml``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sdtp.errors import ConfigError
from sdtp.models.chat import generation_suffix

log = logging.getLogger(__name__)

# Families whose decoder layers share the call signature the pruning hooks rely on
# (hidden_states, attention_mask, position_embeddings, position_ids, and the KV cache, whose keyword
# name depends on the transformers version: sdtp.models.compat). Gemma3's layers also get per-kind
# masks and RoPE (sliding-window vs global; sdtp.models.layer_types).
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gemma3")
# config.model_type of each family's causal LM when it differs from the family name: Gemma3's text-only
# model (1B, 270M) is "gemma3_text"; the multimodal "gemma3" (4B+) nests its decoder and is not supported.
MODEL_TYPES = {"gemma3": "gemma3_text"}
_FAMILY_OF_TYPE = {MODEL_TYPES.get(family, family): family for family in SUPPORTED_FAMILIES}
SOURCES = ("tiny", "hub", "gguf_package")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True if the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX).

    Without it (e.g. AVX2-only AMD EPYC guests) bf16 GEMMs are emulated and ~6x slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """Map a config dtype name to torch; ``auto`` = bf16 on GPU or bf16-capable CPUs, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        native = str(device).startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"model.dtype: {name!r} not in {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[name]


def check_family(family: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"model.family: {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def check_supported(model: nn.Module) -> None:
    """Raise if ``model`` is not one of the architectures the engine is tested on."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILY_OF_TYPE:
        raise ConfigError(
            f"model.family: architecture {model_type!r} is not supported; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (``model.model.layers``)."""
    return model.base_model.layers


def load_model(
    model_cfg: Mapping[str, Any], cache_dir: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load the model described by ``model_cfg``; returns it in eval mode with its tokenizer."""
    check_family(model_cfg["family"])
    source = model_cfg.get("source", "hub")
    dtype = resolve_dtype(model_cfg.get("dtype", "float32"), model_cfg.get("device", "cpu"))
    attn = model_cfg.get("attn_implementation", "sdpa")
    if source == "tiny":
        from sdtp.models.tiny import build_tiny_model

        arch = model_cfg["arch"]
        # Plain lists, not ListConfig: HF's strict config dataclasses type-check e.g. Gemma3's layer_types.
        arch = OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)
        model, tokenizer = build_tiny_model(model_cfg["family"], arch, seed=int(model_cfg.get("seed", 0)))
        model.config._attn_implementation = attn
    elif source == "gguf_package":
        from sdtp.models.gguf import cached_gguf_folder

        folder = cached_gguf_folder(model_cfg, cache_dir)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif source == "hub":
        model = AutoModelForCausalLM.from_pretrained(model_cfg["hf_id"], dtype=dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(model_cfg["hf_id"])
    else:
        raise ConfigError(f"model.source: {source!r} not in {SOURCES}")
    check_supported(model)
    expected = model_cfg.get("num_layers")
    if expected is not None and int(expected) != model.config.num_hidden_layers:
        raise ConfigError(
            f"model.num_layers: config says {expected}, the loaded model has {model.config.num_hidden_layers}"
        )
    model.to(device=model_cfg.get("device", "cpu"), dtype=dtype)
    model.eval().requires_grad_(False)
    log.info("Loaded %s (%s, %d layers, %s on %s)", model_cfg["name"], model.config.model_type,
             model.config.num_hidden_layers, dtype, model_cfg.get("device", "cpu"))
    # The predictor checkpoint records this name; loading checks it matches.
    model.sdtp_name = model_cfg["name"]
    # The SDTP scorer's recency prior recognises chat prompts by their ending (sdtp/scorers/prior.py).
    model.sdtp_chat_suffix = generation_suffix(tokenizer)
    return model, tokenizer
