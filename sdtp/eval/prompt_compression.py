"""Prompt compression before the model reads the prompt: LLMLingua-2 (the paper's Table 1 baseline).

    sdtp-eval experiment=paper_table1 pruning=none compression=llmlingua2 compression.rate=0.63

LLMLingua-2 (Pan et al., 2024; PyPI ``llmlingua``) scores every word of a text with a token
classifier (xlm-roberta-large, or multilingual BERT for LLMLingua-2-small) and keeps the words most
likely to be "preserved". As in its LongBench runs, only the prompt's *context* is compressed (the
instruction and the question around it stay), force tokens (``\\n ? ! .``) are always kept and
repeated ones dropped. The generation runners (``eval=longbench|needle|passage_*``) call
:func:`compressed_ids` per sample; the model then prefills the shorter prompt (dense, or pruned too).

Budget: the compressed prompt has at most ``round(rate * N)`` tokens of the evaluated model, N being
the uncompressed prompt's (template included), so ``1 / rate`` is the compression ratio 1/τ of the
paper. ``llmlingua`` counts its budget with GPT-3.5's tiktoken encoding, downloaded on first use;
here it counts with the evaluated model's tokenizer instead (:class:`TokenCounter`; no download, and
the budget is in the tokens the model reads). The library's threshold is a percentile over those
counts, so the result can overshoot by a few tokens; :meth:`LLMLingua2.compress` asks again with a
smaller target until it fits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from sdtp.errors import ConfigError

log = logging.getLogger(__name__)
METHODS = ("none", "llmlingua2")
# llmlingua 0.2.x merges sub-word pieces into words by rules it picks from the compressor's name.
ARCHITECTURES = ("xlm-roberta-large", "bert-base-multilingual-cased")
MAX_RETRIES = 4


class TokenCounter:
    """The ``encode`` of a tiktoken encoding, over a Hugging Face tokenizer (no special tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids


def _prompt_compressor_class() -> type:
    try:
        from llmlingua import PromptCompressor
    except ImportError as exc:
        raise ConfigError("compression=llmlingua2 needs the `llmlingua` package: pip install -e '.[llmlingua]'") from exc
    return PromptCompressor


class LLMLingua2:
    """LLMLingua-2 with its budget counted by ``count_tokenizer`` (the evaluated model's tokenizer).

    ``model``: the compressor (hub name or local folder; its name must contain one of
    :data:`ARCHITECTURES`). ``force_tokens`` are always kept; ``drop_consecutive`` drops repeats of them.
    """

    def __init__(self, model: str, count_tokenizer: Any, device: str = "cpu", force_tokens: Sequence[str] = (),
                 drop_consecutive: bool = True, max_batch_size: int = 50) -> None:
        cls = _prompt_compressor_class()
        compressor = cls.__new__(cls)
        # PromptCompressor.__init__ without its first line's download of GPT-3.5's tiktoken encoding (the
        # machines here are offline): the same attributes, then the library's own loading.
        compressor.model_name, compressor.use_llmlingua2 = model, True
        compressor.retrieval_model = compressor.retrieval_model_name = None
        compressor.open_api_config, compressor.cache_bos_num, compressor.prefix_bos_num = {}, 10, 100
        compressor.oai_tokenizer = TokenCounter(count_tokenizer)
        compressor.load_model(model, device, {"trust_remote_code": False})
        compressor.init_llmlingua2(max_batch_size=max_batch_size, max_force_token=100)
        compressor.model.eval()
        self.compressor, self.counter = compressor, compressor.oai_tokenizer
        self.force_tokens, self.drop_consecutive = list(force_tokens), drop_consecutive

    def tokens(self, text: str) -> int:
        return len(self.counter.encode(text))

    def compress(self, context: str, target_tokens: int, word_labels: bool = False) -> dict[str, Any]:
        """``context`` cut to at most ``target_tokens`` counted tokens (>= 1 is asked for).

        Returns llmlingua's result dict (``compressed_prompt``; with ``word_labels`` also
        ``fn_labeled_original_prompt``: every word with 1 = kept, 0 = dropped) plus ``tokens`` (of the
        compressed text) and ``calls`` (classifier passes: 1 unless the first overshot).
        """
        ask, calls = max(1, int(target_tokens)), 0
        while True:
            calls += 1
            result = self.compressor.compress_prompt_llmlingua2(
                [context], target_token=ask, force_tokens=self.force_tokens, drop_consecutive=self.drop_consecutive,
                return_word_label=word_labels)
            result["tokens"], result["calls"] = self.tokens(result["compressed_prompt"]), calls
            if result["tokens"] <= max(1, target_tokens) or ask == 1 or calls > MAX_RETRIES:
                return result
            ask = max(1, min(ask - 1, ask * target_tokens // result["tokens"]))  # strictly smaller, in proportion


@dataclass
class PromptCompression:
    """A compressor and the kept fraction ``rate`` of each prompt (see :func:`compressed_ids`)."""

    compressor: LLMLingua2
    rate: float


def validate(cfg: DictConfig) -> None:
    """Check ``cfg.compression`` (absent = none) before the model loads; ConfigError naming the key."""
    comp = cfg.get("compression")
    method = comp.get("method", "none") if comp is not None else "none"
    if method not in METHODS:
        raise ConfigError(f"compression.method: {method!r} not in {METHODS}")
    if method == "none":
        return
    rate = comp.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 < float(rate) <= 1.0:
        raise ConfigError(f"compression.rate: the kept fraction of the prompt must be in (0, 1], got {rate!r}")
    if not any(arch in str(comp.model) for arch in ARCHITECTURES):
        raise ConfigError(f"compression.model: {comp.model!r} must name its architecture ({' or '.join(ARCHITECTURES)}): "
                          "llmlingua merges word pieces by rules it picks from the name")
    _prompt_compressor_class()


def unavailable(model: str) -> str | None:
    """Why LLMLingua-2 with ``model`` cannot run here (package or weights missing), None if it can."""
    try:
        _prompt_compressor_class()
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(model)
        AutoTokenizer.from_pretrained(model)
    except Exception as exc:  # ConfigError, OSError (offline hub, missing folder), ValueError ...
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def build_compression(cfg: DictConfig, tokenizer: Any) -> PromptCompression | None:
    """The run's prompt compression (None for ``compression`` none or absent), counting with ``tokenizer``."""
    validate(cfg)
    comp = cfg.get("compression")
    if comp is None or comp.get("method", "none") == "none":
        return None
    log.info("Instantiating LLMLingua-2 compressor <%s> (kept fraction %s)", comp.model, comp.rate)
    compressor = LLMLingua2(str(comp.model), tokenizer, device=str(comp.device), force_tokens=list(comp.force_tokens),
                            drop_consecutive=bool(comp.drop_consecutive), max_batch_size=int(comp.max_batch_size))
    return PromptCompression(compressor, float(comp.rate))


def split_context(prompt: str, context: str) -> tuple[str, str, str]:
    """(head, context, tail) of ``prompt`` around the first occurrence of ``context``.

    When ``context`` is not in the prompt (a middle truncation cut into the template), the whole
    prompt is treated as context.
    """
    start = prompt.find(context) if context else -1
    if start < 0:
        return "", prompt, ""
    return prompt[:start], context, prompt[start + len(context):]


def compressed_ids(compression: PromptCompression | None, prompt: str, context: str,
                   encode: Callable[[str], torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(1, N') ids of ``prompt`` with its ``context`` compressed, and the sample's compression record.

    ``encode`` turns prompt text into the model's input ids (chat template, answer prefix). The
    budget is ``round(rate * N)`` input tokens, N those of the uncompressed prompt; the text around
    the context is kept, so the context gets the budget minus its tokens (none when the text around
    it alone exceeds the budget: then the prompt is that text). Without compression: the plain ids and {}.
    """
    original = encode(prompt)
    if compression is None:
        return original, {}
    head, body, tail = split_context(prompt, context)
    n = int(original.shape[1])
    around = n - compression.compressor.tokens(body)  # template, chat wrapper, question, answer prefix
    target = round(compression.rate * n) - around
    start = time.perf_counter()
    result = compression.compressor.compress(body, target) if target > 0 else {"compressed_prompt": "", "tokens": 0,
                                                                              "calls": 0}
    seconds = time.perf_counter() - start
    ids = encode(head + result["compressed_prompt"] + tail)
    return ids, {"original_prompt_tokens": n, "compress_s": round(seconds, 4), "compress_calls": result["calls"],
                 "context_tokens": n - around, "compressed_context_tokens": result["tokens"]}


def compression_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Over a run's prediction rows: original vs compressed prompt tokens and compressor seconds ({} if none)."""
    done = [r for r in rows if "original_prompt_tokens" in r]
    if not done:
        return {}
    original, kept = sum(r["original_prompt_tokens"] for r in done), sum(r["prompt_tokens"] for r in done)
    return {"compression_ratio": original / kept if kept else float("nan"),
            "avg_original_prompt_tokens": original / len(done), "compress_s": round(sum(r["compress_s"] for r in done), 3)}


def main(argv: list[str] | None = None) -> int:
    """``python -m sdtp.eval.prompt_compression check <model>``: exit 1 (reason on stdout) if it cannot load."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="can LLMLingua-2 load this compressor here?").add_argument("model")
    args = parser.parse_args(argv)
    from sdtp.config import offline_by_default

    offline_by_default()  # as the entry points: a hub name fails at once on an offline machine, not after retries
    reason = unavailable(args.model)
    print(reason or "available")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
