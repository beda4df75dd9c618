"""``sdtp-generate``: generate from a prompt with (or without) prefill token pruning.

    sdtp-generate model=smollm2-135m pruning=random prompt="..." max_new_tokens=32
    sdtp-generate pruning=sdtp kv=h2o kv.ratio=0.4      # token pruning + H2O KV compression

Prints the generated text, then as the last stdout line one JSON object with ``text``,
``prompt_tokens``, ``kept_per_stage``, ``prefill_s``, ``decode_s`` (and more).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sdtp.config import build_pruner, sdtp_main
from sdtp.engine.cache import cache_bytes
from sdtp.engine.generation import SamplingConfig, generate
from sdtp.kv import build_kv_policy, kv_compression
from sdtp.models import load_model
from sdtp.utils import seed_everything, set_threads

log = logging.getLogger(__name__)


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> torch.Tensor:
    """(1, N) prompt ids, used as given or wrapped in the tokenizer's chat template."""
    if chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def run(cfg: DictConfig) -> dict[str, Any]:
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    pruner = build_pruner(cfg)
    kv_policy = build_kv_policy(cfg)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    prompt = Path(cfg.prompt_file).read_text() if cfg.prompt_file else cfg.prompt
    input_ids = encode_prompt(tokenizer, prompt, cfg.chat_template).to(cfg.model.device)
    sampling = SamplingConfig(cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    with kv_compression(kv_policy, model):
        result = generate(model, input_ids, cfg.max_new_tokens, pruner, sampling, tokenizer.eos_token_id)
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    summary = {
        "text": text,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.tokens),
        "kept_per_stage": result.kept_per_stage,
        "stage_layers": list(pruner.schedule.layers) if pruner else [],
        "prefill_s": round(result.prefill_s, 4),
        "decode_s": round(result.decode_s, 4),
        "kv_cache_bytes": cache_bytes(result.cache),
        "model": cfg.model.name,
        "pruning": cfg.pruning.name,
        "kv": kv_policy.method if kv_policy else "none",
        "kv_ratio": kv_policy.ratio if kv_policy else 1.0,
    }
    print(text)
    print(json.dumps(summary))
    return summary


@sdtp_main("generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
