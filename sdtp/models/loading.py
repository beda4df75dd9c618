"""Load a causal LM + tokenizer from a ``model`` config node (see ``conf/model/*.yaml``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


def model_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen model as it is loaded: its source and weights' identity (hub id, GGUF file or digest, tiny
    architecture and seed...) and the dtype ``auto`` resolves to here. What a training checkpoint and a label
    set must share with the run that uses them; the name, device and schedule are not part of it."""
    fields = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    base = {k: v for k, v in fields.items() if k not in ("name", "device", "schedule", "max_length", "install")}
    base["dtype"] = str(resolve_dtype(model_cfg["dtype"], model_cfg.get("device", "cpu")))
    return base


def check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot use, before any weights are read.

    Not part of config validation: the 7B configs name ``cuda`` and must still compose on a CPU machine.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device}: no CUDA device is available to torch {torch.__version__} here; "
                          "use model.device=cpu")


def check_source(hf_id: str) -> None:
    """Refuse a hub model that cannot be found: a local path that is not a folder, or an id that is neither
    cached nor downloadable because the hub is offline (HF_HUB_OFFLINE=1)."""
    if str(hf_id).startswith(("/", "./", "../", "~")):
        if not Path(hf_id).expanduser().is_dir():
            raise ConfigError(f"model.hf_id: {hf_id} is not a folder (a local model folder or a hub id)")
        return
    if Path(hf_id).is_dir():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(hf_id, "config.json"), str):
        raise ConfigError(f"model.hf_id: {hf_id} is not in the Hugging Face cache and the hub is offline "
                          "(HF_HUB_OFFLINE=1); download it first or point model.hf_id at a local folder")


def check_family(family: str) -> None:
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"model.family: {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def check_supported(model: nn.Module) -> None:
    """Raise if ``model`` is not one of the architectures the engine is tested on."""
    check_config(getattr(model, "config", None))


def check_config(config: Any, num_layers: int | None = None, family: str | None = None) -> None:
    """A model's own config (read before its weights, so a wrong model costs no load): a supported architecture,
    the ``family`` the model config names (if given), and the same number of decoder layers (if given)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILY_OF_TYPE:
        raise ConfigError(
            f"model.family: architecture {model_type!r} is not supported; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    if family is not None and _FAMILY_OF_TYPE[model_type] != family:
        # Results, predictors and labels are filed under the model config's name: it must describe this model.
        raise ConfigError(f"model.family: the config says {family!r}, but the model is a "
                          f"{_FAMILY_OF_TYPE[model_type]!r} (model_type {model_type!r}); use that model's config "
                          "or fix model.family")
    if num_layers is not None and int(num_layers) != config.num_hidden_layers:
        raise ConfigError(f"model.num_layers: config says {num_layers}, the model has {config.num_hidden_layers}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM (``model.model.layers``)."""
    return model.base_model.layers


def load_model(
    model_cfg: Mapping[str, Any], cache_dir: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build or load the model described by ``model_cfg``; returns it in eval mode with its tokenizer."""
    check_family(model_cfg["family"])
    check_device(str(model_cfg.get("device", "cpu")))
    source = model_cfg.get("source", "hub")
    dtype = resolve_dtype(model_cfg.get("dtype", "float32"), model_cfg.get("device", "cpu"))
    attn = model_cfg.get("attn_implementation", "sdpa")
    num_layers = model_cfg.get("num_layers")
    if source == "tiny":
        from sdtp.models.tiny import build_tiny_model

        arch = model_cfg["arch"]
        # Plain lists, not ListConfig: HF's strict config dataclasses type-check e.g. Gemma3's layer_types.
        arch = OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else dict(arch)
        model, tokenizer = build_tiny_model(model_cfg["family"], arch, seed=int(model_cfg.get("seed", 0)))
        model.config._attn_implementation = attn
        check_config(model.config, num_layers, model_cfg["family"])
    elif source == "gguf_package":
        from sdtp.models.gguf import cached_gguf_folder

        folder = cached_gguf_folder(model_cfg, cache_dir)
        check_config(AutoConfig.from_pretrained(folder), num_layers, model_cfg["family"])
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif source == "hub":
        check_source(str(model_cfg["hf_id"]))
        check_config(AutoConfig.from_pretrained(model_cfg["hf_id"]), num_layers, model_cfg["family"])
        model = AutoModelForCausalLM.from_pretrained(model_cfg["hf_id"], dtype=dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(model_cfg["hf_id"])
    else:
        raise ConfigError(f"model.source: {source!r} not in {SOURCES}")
    model.to(device=model_cfg.get("device", "cpu"), dtype=dtype)
    model.eval().requires_grad_(False)
    log.info("Loaded %s (%s, %d layers, %s on %s)", model_cfg["name"], model.config.model_type,
             model.config.num_hidden_layers, dtype, model_cfg.get("device", "cpu"))
    # The predictor checkpoint records this name; loading checks it matches.
    model.sdtp_name = model_cfg["name"]
    # The SDTP scorer's recency prior recognises chat prompts by their ending (sdtp/scorers/prior.py).
    model.sdtp_chat_suffix = generation_suffix(tokenizer)
    return model, tokenizer
