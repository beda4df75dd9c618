"""The lm-eval ``sdtp`` model: parity with HFLM when dense, and the pruned-context semantics."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from sdtp.engine.cache import cache_lengths
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.eval.lm_eval_model import SDTPLM
from sdtp.eval.scoring import prefill_context, score_continuation
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.scorers.random import RandomScorer

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [
    ("The quick brown fox jumps over the lazy", " dog"),
    ("Question: What is the capital of France?\nAnswer:", " Paris is the capital and largest city."),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("", "An empty context is scored after the prefix token."),
    ("In 1492 Columbus sailed the ocean blue, and then " * 6, " he reached the Bahamas"),
]
ROLLING = ["A rolling log-likelihood over a whole document, split into windows by lm-eval. " * 4]
KEEP_ALL = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
PRUNE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.7, 0.5, 0.35), keep_first=4, keep_recent=0.1)


def _requests(pairs=PAIRS) -> list[Instance]:
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def _rolling() -> list[Instance]:
    return [Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=i) for i, text in enumerate(ROLLING)]


@pytest.fixture(scope="module")
def hf_lm(tiny_llama):
    model, tokenizer, _ = tiny_llama
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=128)


def test_sdtp_is_registered_with_lm_eval():
    assert get_model("sdtp") is SDTPLM


def test_dense_adapter_equals_hflm_exactly(tiny_llama, hf_lm):
    model, tokenizer, _ = tiny_llama
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=128)
    assert lm.loglikelihood(_requests()) == hf_lm.loglikelihood(_requests())
    assert lm.loglikelihood_rolling(_rolling()) == hf_lm.loglikelihood_rolling(_rolling())


def test_engine_path_keeping_everything_matches_hflm(tiny_llama, hf_lm):
    """The pruned code path (prefill + continuation on the cache) with nothing pruned = HFLM's dense pass."""
    model, tokenizer, _ = tiny_llama
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(KEEP_ALL, RandomScorer()), max_length=128)
    ours, ref = lm.loglikelihood(_requests()), hf_lm.loglikelihood(_requests())
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, ref, strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
        assert greedy == greedy_ref
    # Truncation from the left (context + continuation > max_length + 1) follows HFLM too.
    for ll, ll_ref in zip(lm.loglikelihood_rolling(_rolling()), hf_lm.loglikelihood_rolling(_rolling()), strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
    assert lm.kept.summary()["avg_kept_fraction"] == 1.0


def test_pruning_changes_scores_and_only_the_context_is_pruned(tiny_llama, hf_lm):
    model, tokenizer, _ = tiny_llama
    pruner = TokenPruner(PRUNE, RandomScorer(seed=0))
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=pruner, max_length=128)
    pruned = lm.loglikelihood(_requests())
    dense = hf_lm.loglikelihood(_requests())
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(pruned, dense))
    # One prefill per distinct context (the two capital-of-France choices share one), each of the
    # context only: the first pair's prefill has exactly the context's tokens.
    assert lm.kept.summary()["pruned_prefills"] == len(PAIRS) - 1
    assert len(lm.tok_encode(PAIRS[0][0])) in lm.kept.prompt_tokens
    assert max(lm.kept.prompt_tokens) <= 128


def test_continuation_tokens_are_never_pruned(tiny_llama):
    model, tokenizer, _ = tiny_llama
    pruner = TokenPruner(PRUNE, RandomScorer(seed=1))
    ctx = tokenizer("Some long context that will be pruned layer by layer. " * 3, return_tensors="pt").input_ids
    cont = tokenizer(" and a continuation of a few tokens", return_tensors="pt").input_ids
    prefilled = prefill_context(model, ctx, pruner)
    record = prefilled.record
    assert record.seq_len == ctx.shape[1] and record.kept_per_stage[-1] < ctx.shape[1]
    assert int(record.final_positions[0, -1]) == ctx.shape[1] - 1  # last context position kept
    logprobs, _ = score_continuation(model, prefilled, cont, pruner, reuse=True)
    assert logprobs.shape == (cont.shape[1],)
    # Every layer's cache = its surviving context tokens + ALL fed continuation tokens.
    fed = cont.shape[1] - 1
    assert cache_lengths(prefilled.cache) == record.tokens_per_layer  # reuse=True left the prefill cache intact
    # Reference: the engine's token-by-token decode on the same pruned cache (a different code path).
    pruner = TokenPruner(PRUNE, RandomScorer(seed=1))  # same seed, first prompt: the same mask as above
    decoded = prefill_context(model, ctx, pruner)
    cache, logits, expected = decoded.cache, decoded.last_logits, []
    with torch.inference_mode(), pruner(model):
        pruner.last_prefill = decoded.record
        for step in range(cont.shape[1]):
            expected.append(torch.log_softmax(logits, -1)[0, cont[0, step]])
            out = model(input_ids=cont[:, step : step + 1], **cache_kwargs(cache), use_cache=True)
            cache, logits = output_cache(out), out.logits[:, -1]
    assert cache_lengths(cache) == [n + fed + 1 for n in record.tokens_per_layer]
    torch.testing.assert_close(logprobs, torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_pruned_scores_are_deterministic(tiny_llama):
    model, tokenizer, _ = tiny_llama
    make = lambda: SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(PRUNE, RandomScorer(seed=0)),
                          max_length=128)
    assert make().loglikelihood(_requests()) == make().loglikelihood(_requests())


def test_generate_until_under_pruner(tiny_llama, hf_lm):
    """Keeping everything, pruned generation equals HFLM's; real pruning still generates and is recorded."""
    model, tokenizer, _ = tiny_llama
    prompt = "Once upon a time there was a tiny model that " * 3
    request = lambda: [Instance("generate_until", doc={}, idx=0,
                                arguments=(prompt, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}))]
    keep_all = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(KEEP_ALL, RandomScorer()),
                      max_length=128)
    assert keep_all.generate_until(request()) == hf_lm.generate_until(request())
    pruned = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(PRUNE, RandomScorer()), max_length=128)
    assert isinstance(pruned.generate_until(request())[0], str)
    assert pruned.kept.summary()["avg_kept_fraction"] < 0.5
