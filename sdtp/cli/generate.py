"""``sdtp-generate``: generate from a prompt with (or without) prefill token pruning.

    sdtp-generate model=smollm2-135m pruning=random prompt="..." max_new_tokens=32
    sdtp-generate pruning=sdtp kv=h2o kv.ratio=0.4      # token pruning + H2O KV compression

Prints the generated text, then as the last stdout line one JSON object with ``text``,
``prompt_tokens``, ``kept_per_stage``, ``prefill_s``, ``decode_s`` (and more).

Text that Hydra's override grammar cannot take as ``prompt=...`` (``=``, quotes, newlines,
brackets, commas) goes through a file or stdin:

    sdtp-generate prompt_file=doc.txt
    cat doc.txt | sdtp-generate prompt_file=-

The prompt (and ``prompt_file``) and ``max_new_tokens`` are checked before the model loads; a
prompt that does not fit ``model.max_length`` with its new tokens is refused before generation.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sdtp.config import build_pruner, sdtp_main
from sdtp.engine.cache import cache_bytes
from sdtp.errors import ConfigError
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


STDIN = "-"
PROMPT_HINT = ("put the text in a file and pass prompt_file=PATH, or pipe it in: "
               "`cat doc.txt | sdtp-generate prompt_file=-`")


def read_prompt(cfg: DictConfig) -> str:
    """The prompt text from ``prompt_file`` (``-`` = stdin) or ``prompt``; ConfigError naming the key."""
    if cfg.get("prompt_file"):
        source = str(cfg.prompt_file)
        try:
            raw = sys.stdin.buffer.read() if source == STDIN else Path(source).read_bytes()
        except OSError as exc:
            raise ConfigError(f"prompt_file: cannot read {source} ({exc.strerror or exc})") from None
        try:
            prompt = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError(f"prompt_file: {source} line {line} is not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
        key = f"prompt_file ({'stdin' if source == STDIN else source})"
    else:
        prompt, key = cfg.get("prompt"), "prompt"
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt: expected text, got {prompt!r} ({type(prompt).__name__}); quote it "
                              f"(prompt='\"{prompt}\"') or {PROMPT_HINT}")
    if not prompt.strip():
        raise ConfigError(f"{key}: the prompt is empty")
    return prompt


def check_settings(cfg: DictConfig) -> None:
    """Generation settings, before the model loads."""
    new = cfg.get("max_new_tokens")
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise ConfigError(f"max_new_tokens: must be an integer >= 1, got {new!r}")
    if not isinstance(cfg.get("chat_template"), bool):
        raise ConfigError(f"chat_template: must be true or false, got {cfg.get('chat_template')!r}")
    sampling = {"temperature": (cfg.temperature, "> 0", lambda v: v > 0),
                "top_p": (cfg.top_p, "in (0, 1]", lambda v: 0 < v <= 1),
                "top_k": (cfg.top_k, ">= 0 (0 = off)", lambda v: v >= 0 and float(v).is_integer())}
    for key, (value, allowed, ok) in sampling.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
            raise ConfigError(f"{key}: must be {allowed}, got {value!r}")


def check_length(cfg: DictConfig, prompt_tokens: int) -> None:
    """Prompt + new tokens must fit the model's context (positions past it are untrained / out of table)."""
    limit = int(cfg.model.max_length)
    if prompt_tokens + int(cfg.max_new_tokens) > limit:
        source = f"prompt_file={cfg.prompt_file}" if cfg.get("prompt_file") else "prompt"
        raise ConfigError(f"{source}: {prompt_tokens} prompt tokens + max_new_tokens={cfg.max_new_tokens} exceed "
                          f"model.max_length={limit}; shorten the prompt or lower max_new_tokens")


def run(cfg: DictConfig) -> dict[str, Any]:
    check_settings(cfg)
    prompt = read_prompt(cfg)  # before the model: a bad file should not cost a model load
    seed_everything(cfg.seed)
    set_threads(cfg.threads)
    pruner = build_pruner(cfg)
    kv_policy = build_kv_policy(cfg)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    input_ids = encode_prompt(tokenizer, prompt, cfg.chat_template).to(cfg.model.device)
    check_length(cfg, input_ids.shape[1])
    # check_settings accepts an integral float (top_k=5.0), but torch's topk needs an int
    sampling = SamplingConfig(cfg.do_sample, cfg.temperature, int(cfg.top_k), cfg.top_p, cfg.seed)
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
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def prompt_argument_problem(argv: list[str]) -> str | None:
    """Why Hydra's grammar would reject (or sweep over) a ``prompt=...`` argument, with the way around it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    sweeping = "-m" in argv or "--multirun" in argv
    for arg in argv:
        if not arg.lstrip("+~").startswith("prompt="):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException as exc:
            return f"prompt: Hydra's override grammar cannot parse {arg!r} ({str(exc).splitlines()[0]}); {PROMPT_HINT}"
        if override.is_sweep_override() and not sweeping:  # e.g. a comma: Hydra reads "a, b" as a list of values to sweep
            return f"prompt: Hydra reads {arg!r} as several values (a sweep); {PROMPT_HINT}"
    return None


def main() -> None:
    problem = prompt_argument_problem(sys.argv[1:])
    if problem:
        print(f"Error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
