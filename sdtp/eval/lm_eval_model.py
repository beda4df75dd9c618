"""The ``sdtp`` model for lm-evaluation-harness: HFLM whose contexts are token-pruned during prefill.

Pruning semantics (what :meth:`SDTPLM._loglikelihood_tokens` computes for each request):

* the CONTEXT (few-shot examples + question, left-truncated like HFLM to ``max_length + 1``
  tokens together with the continuation) is prefilled once with the pruner installed: tokens are
  physically dropped layer by layer, the first ``keep_first`` and the last ``keep_recent`` of the
  context are always kept, so the last context position survives and its logits
  (``out.logits[:, -1]``) score the first continuation token;
* the CONTINUATION tokens are never pruned: they are fed on top of the pruned KV cache and scored
  there, exactly as generation would proceed after a pruned prompt. No dense pass is involved.
  Requests that share a context (the choices of one multiple-choice question) share one pruned
  prefill;
* log-probs (in HFLM's ``softmax_dtype``, the forwards under its ``mixed_precision_dtype`` autocast),
  ``is_greedy`` and caching follow HFLM: in one process each
  batch's answers reach lm-eval's request cache (``use_cache``) as soon as the batch is scored, as HFLM's
  do, so a killed run keeps them (``sdtp-eval``'s in-run checkpoint, :mod:`sdtp.eval.harness`);
  ``generate_until`` runs HF ``generate`` under the pruner (prompt pruned once), one prompt at a
  time: a pruner with ``batch_size`` > 1 is refused there (ConfigError);
* ``loglikelihood_rolling`` is refused (ConfigError) with a pruner: HFLM cuts a document into
  windows whose context is one token (all but a short last window), so (nearly) nothing would be
  pruned and the score would equal the dense one while the kept fraction says otherwise.
  ``sdtp-eval eval=lm_eval`` refuses such tasks before loading the model
  (:func:`sdtp.eval.harness.validate`); pruned perplexity is ``eval=perplexity`` or
  ``eval=continuation``. The dense model runs them as HFLM does.

With no pruner and no KV policy the class is plain HFLM (same batching, same numbers as ``--model hf``).

KV-cache compression (``kv_policy``, ``sdtp-eval ... kv=h2o``; the hooks are installed around the
whole evaluation by ``sdtp-eval``, :func:`sdtp.kv.kv_compression`). HFLM's dense path scores each
request in one forward over context + continuation, where no cache is ever read back: compressing
it would change nothing. So with a KV policy every request takes the path above, with or without
a pruner: the context is prefilled (pruned, if a pruner is given), the policy cuts the prefill's
cache at the end of that forward, and the continuation tokens are scored on the compressed cache
(every choice of the context in one forward; :class:`sdtp.kv.cache.CompressedCache` gathers each
layer's mask to the entries every KV head kept). Contexts are prefilled one at a time (a KV budget
is a fraction of a row's prompt, which left padding would distort; ``batch_size`` is then not used
for log-likelihood requests). A prefill that was not compressed (hooks missing) raises instead of
scoring an uncompressed cache, and ``generate_until`` without the hooks is refused likewise.
``loglikelihood_rolling`` is refused as with a pruner (1-token contexts leave nothing to compress),
``generate_until`` needs ``batch_size`` 1.

Batching with a pruner. ``batch_size`` (an integer; ``auto`` is refused, its probe measures the
dense forward) counts CONTEXTS, the rows of the expensive forward, as it counts the rows of
HFLM's dense forward: the distinct contexts are sorted longest first (so left padding is small,
as HFLM sorts its requests), ``batch_size`` of them are prefilled together left-padded, each row
pruned by its own budget, and then every continuation of those contexts (all their choices) is
scored in one more forward on a row-selected copy of the pruned cache
(:func:`sdtp.eval.scoring.score_continuations`; 1-token continuations need none). Results come
back in request order. Scores equal batch 1 up to float noise for deterministic scorers
(``tests/test_eval_lm_harness.py``); ``pruning=random`` draws per batch, so its kept sets depend on
the batch composition.

Data parallelism (``torchrun`` / ``accelerate launch -m sdtp.cli.evaluate eval=lm_eval``, docs/scaling.md).
Each rank holds its own replica of the model, pruner and KV policy. lm-eval is told it runs in one
process, so every rank builds every request exactly as one process does; this class then scores only
this rank's share and gathers everyone's results (:func:`sdtp.distributed.sharded_map`), so every rank
returns the full list. Log-likelihood requests are dealt by CONTEXT (longest first, round-robin: the
choices of one question stay on one rank and share its prefill; ranks get similar token counts),
generation requests one by one. lm-eval's own data parallelism (``rank`` / ``world_size`` on the model)
is not used: it shards the documents before building their prompts, and its few-shot sampler is one
random stream advanced document by document, so with N ranks a document gets other few-shot examples
than in one process and the scores differ whenever ``num_fewshot`` > 0.

Usage: ``sdtp-lm-eval --model sdtp --model_args model=smollm2-135m,pruning=random --tasks ...``
(lm-eval has no plugin discovery, so its own ``lm_eval`` CLI does not see ``sdtp`` unless this
module is imported; ``sdtp-lm-eval`` is lm-eval's CLI with the model registered), or in Python
``SDTPLM(pretrained=model, tokenizer=tok, pruner=pruner)`` passed to ``simple_evaluate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from sdtp.distributed import World, joined_world, sharded_map
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.harness import rolling_refusal
from sdtp.eval.kept import KeptLedger, KeptStats
from sdtp.eval.scoring import prefill_contexts, score_continuations
from sdtp.kv import CompressedCache, KVCompressor, KVPolicy, kv_enabled

log = logging.getLogger(__name__)
Request = tuple[tuple[str, str] | None, list[int], list[int]]
Answer = tuple[float, bool]


def _split_overrides(overrides: str | None) -> list[str]:
    """``"pruning.keep_ratio=0.8;pruning.keep_recent=0.2"`` -> Hydra overrides (``;`` since lm-eval splits on ``,``)."""
    return [item.strip() for item in (overrides or "").split(";") if item.strip()]


def _arg_text(value: Any, default: str | None) -> str | None:
    """A ``--model_args`` value back as typed: lm-eval's parser turns ``none`` into None and ``1`` into an int,
    but ``pruning=none`` names the dense config; None gives ``default``."""
    return default if value is None else str(value)


def _uncompressed(policy: KVPolicy, what: str) -> RuntimeError:
    """The error for requests that would run on a cache ``policy`` did not compress (its hooks are not installed);
    ``what`` says which."""
    return RuntimeError(f"kv={policy.method}: {what} not compressed; run inside `with kv_compression(policy, "
                        "model)` (sdtp-eval installs it)")


def load_from_config(model: str, pruning: str, overrides: str | None, pretrained: str | None):
    """(model, tokenizer, pruner, cfg) from the sdtp configs, for ``--model_args`` use."""
    from sdtp.config import build_pruner, compose, quoted_override
    from sdtp.models import load_model

    # quoted: a local folder's path may hold characters Hydra's override grammar refuses (=, spaces, commas)
    extra = ["model.source=hub", quoted_override("model.hf_id", pretrained)] if pretrained else []
    cfg = compose("eval", [f"model={model}", f"pruning={pruning}", *extra, *_split_overrides(overrides)])
    if kv_enabled(cfg):
        raise ConfigError(f"kv={cfg.kv.method} in --model_args: lm-eval's CLI installs no KV compression hooks; "
                          "run `sdtp-eval eval=lm_eval kv=...` instead")
    hf_model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    return hf_model, tokenizer, build_pruner(cfg), cfg


@register_model("sdtp")
class SDTPLM(HFLM):
    """HFLM + prefill token pruning and/or KV-cache compression of each request's context (module docstring)."""

    def __init__(
        self,
        pretrained: Any = None,
        tokenizer: Any = None,
        pruner: TokenPruner | None = None,
        kv_policy: KVPolicy | None = None,
        model: str = "smollm2-135m",
        pruning: str = "none",
        overrides: str | None = None,
        world: World | None = None,
        **kwargs: Any,
    ) -> None:
        if pretrained is None or isinstance(pretrained, str):
            pretrained, tokenizer, pruner, cfg = load_from_config(
                _arg_text(model, "none"), _arg_text(pruning, "none"), _arg_text(overrides, None), pretrained)
            kwargs.setdefault("max_length", int(cfg.model.max_length))
        kwargs.pop("device", None)  # the model is already placed; HFLM ignores device for instances
        if (pruner is not None or kv_policy is not None) and str(kwargs.get("batch_size", 1)).startswith("auto"):
            raise ConfigError("batch_size=auto with a pruner or KV policy: lm-eval's probe sizes the dense forward; "
                              "give an integer (it counts contexts prefilled together)")
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)
        self.pruner = pruner
        self.kv_policy = kv_policy
        self._kept = KeptStats()  # this rank's prefills only
        self.kept_ledger: KeptLedger | None = None  # set by keep_records_in (the in-run checkpoint)
        # Not HFLM's rank / world_size, which stay 0 and 1: lm-eval builds every request on every rank.
        self.world = world or joined_world()

    @property
    def kept(self) -> KeptStats:
        """This rank's pruned prefills (with :meth:`keep_records_in`, those of the interrupted sessions too)."""
        return self._kept if self.kept_ledger is None else self.kept_ledger.stats()

    def keep_records_in(self, path: Path) -> None:
        """Record every pruned prefill in ``path`` as it happens and count those already there (in-run checkpoint:
        the requests lm-eval's cache answers are not prefilled again, :class:`sdtp.eval.kept.KeptLedger`)."""
        self.kept_ledger = KeptLedger(path)

    def _add_kept(self, record: Any, *key: Any) -> None:
        """Count one prefill's record; ``key`` (JSON-able: what was prefilled) names it in the checkpoint."""
        if self.kept_ledger is None:
            self._kept.add(record)
        else:
            self.kept_ledger.add(KeptLedger.key(*key), record)

    @property
    def uses_cache_path(self) -> bool:
        """Whether requests are scored on the prefilled cache (a pruner or a KV policy), not by HFLM."""
        return self.pruner is not None or self.kv_policy is not None

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling log-likelihood for the dense model; refused with a pruner or KV policy (module docstring)."""
        if self.uses_cache_path:
            what = "a pruner" if self.pruner is not None else f"kv={self.kv_policy.method}"
            raise ConfigError(rolling_refusal(f"{len(requests)} loglikelihood_rolling request(s) with {what}"))
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[Answer]:
        quiet = disable_tqdm or not self.world.is_main
        if not self.uses_cache_path:
            dense = super()._loglikelihood_tokens
            return sharded_map(lambda mine: dense(mine, disable_tqdm=quiet, override_bs=override_bs), requests,
                               self.world)
        groups = self._context_groups(requests)
        contexts = sorted(groups, key=lambda ctx: (-len(ctx), ctx))  # longest first: little padding per batch

        def cache(answers: list[tuple[int, Answer]]) -> None:
            """Hand answers to lm-eval's request cache (``use_cache``: CachingLM; a no-op without one)."""
            for index, answer in answers:
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)

        # One process: each batch's answers are cached as soon as it is scored, so a killed run keeps them (the
        # in-run checkpoint). Data parallel: after the gather, as before (every rank holds every answer then).
        single = self.world.size == 1
        on_batch = cache if single else None
        scored = sharded_map(lambda mine: self._score_contexts(mine, groups, quiet, override_bs, on_batch), contexts,
                             self.world)
        results: list[Answer | None] = [None] * len(requests)
        for answers in scored:
            for index, answer in answers:
                results[index] = answer
            if not single:
                cache(answers)
        return results  # type: ignore[return-value]

    def _score_contexts(self, contexts: list[tuple[int, ...]],
                        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]], quiet: bool,
                        override_bs: int | None, on_batch: Callable[[list[tuple[int, Answer]]], None] | None = None
                        ) -> list[list[tuple[int, Answer]]]:
        """Prefill ``contexts`` in batches, score their continuations; per context, [(request index, answer)].

        ``on_batch`` receives each batch's answers once they are scored (and its kept records saved).
        """
        # KV budgets are fractions of each row's prompt: left padding would count, so one context per prefill.
        batch_size = 1 if self.kv_policy is not None else int(override_bs or self.batch_size)
        answers: dict[int, Answer] = {}
        desc = "Pruned loglikelihood" if self.pruner is not None else f"{self.kv_policy.method} KV loglikelihood"
        pbar = tqdm(total=sum(len(groups[ctx]) for ctx in contexts), disable=quiet, desc=desc)
        for start in range(0, len(contexts), batch_size):
            batch = self._score_batch(contexts[start : start + batch_size], groups)
            answers.update(batch)
            if on_batch is not None:
                on_batch(batch)
            pbar.update(len(batch))
        pbar.close()
        return [[(index, answers[index]) for index, _ in groups[ctx]] for ctx in contexts]

    def _context_groups(self, requests: list[Request]) -> dict[tuple[int, ...], list[tuple[int, list[int]]]]:
        """Truncated context -> [(request index, continuation)], so the choices of one question share a prefill.

        Truncation follows HFLM: context + continuation keep their last ``max_length + 1`` tokens.
        """
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (_, context_enc, continuation_enc) in enumerate(requests):
            assert len(context_enc) > 0 and 0 < len(continuation_enc) <= self.max_length
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            groups.setdefault(tuple(whole[: -len(continuation_enc)]), []).append((index, continuation_enc))
        return groups

    def _score_batch(self, batch: list[tuple[int, ...]], groups: dict[tuple[int, ...], list[tuple[int, list[int]]]]
                     ) -> list[tuple[int, Answer]]:
        """Prefill the contexts ``batch`` together, score all their continuations; [(request index, answer)]."""
        # HFLM runs its forwards under autocast to mixed_precision_dtype (None: off); so do these.
        prefilled = prefill_contexts(self.model, [torch.tensor([ctx], device=self.device) for ctx in batch],
                                     self.pruner, autocast=self.mixed_precision_dtype)
        if self.kv_policy is not None and not isinstance(prefilled.cache, CompressedCache):
            raise _uncompressed(self.kv_policy, "the prefill's cache was")
        for row in range(len(batch) if prefilled.record is not None else 0):
            self._add_kept(prefilled.record.row(row), "loglikelihood", batch[row])
        if self.kept_ledger is not None:  # before the answers reach the cache: a cached context needs its record
            self.kept_ledger.save()
        members = [(row, index, cont) for row, ctx in enumerate(batch) for index, cont in groups[ctx]]
        scored = score_continuations(
            self.model, prefilled, [torch.tensor([cont], device=self.device) for _, _, cont in members], self.pruner,
            rows=[row for row, _, _ in members],
            dtype=self.softmax_dtype,  # HFLM's dense path takes its log-softmax in this dtype
            autocast=self.mixed_precision_dtype,
        )
        return [(index, (float(logprobs.sum()), greedy)) for (_, index, _), (logprobs, greedy) in zip(members, scored)]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """HFLM's generation; with a pruner or KV policy only at batch size 1 (one prompt per prefill), with a KV
        policy only inside its hooks (otherwise generation would silently run on the full cache)."""
        if self.uses_cache_path and self.batch_size != 1:
            raise ConfigError(f"{len(requests)} generate_until request(s) with a pruner or KV policy and batch_size="
                              f"{self.batch_size}: pruned or KV-compressed generation runs one prompt at a time; use "
                              "batch_size=1 (only log-likelihood requests are batched with a pruner)")
        if self.kv_policy is not None and not KVCompressor.installed_on(self.model):
            raise _uncompressed(self.kv_policy, f"{len(requests)} generate_until request(s) would run on a cache")
        generate = super().generate_until
        quiet = disable_tqdm or not self.world.is_main
        return sharded_map(lambda mine: generate(mine, disable_tqdm=quiet), requests, self.world)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any):
        if self.pruner is None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        if context.shape[0] != 1:
            raise NotImplementedError("pruned generation runs one prompt at a time (batch_size=1)")
        with self.pruner(self.model):
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        # Keyed by what decides the request's output: lm-eval caches it by prompt and generation settings.
        self._add_kept(self.pruner.last_prefill, "generate_until", context[0].tolist(), max_length, list(stop))
        if self.kept_ledger is not None:
            self.kept_ledger.save()
        return out
