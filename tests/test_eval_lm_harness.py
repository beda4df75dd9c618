"""The lm-eval ``sdtp`` model: parity with HFLM when dense, and the pruned-context semantics."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.models.huggingface import HFLM

from sdtp.cli import evaluate
from sdtp.config import compose
from sdtp.engine.cache import cache_lengths
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.eval.harness import rolling_tasks
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
    long = [(PAIRS[-1][0] * 4, PAIRS[-1][1])]
    assert len(lm.tok_encode(long[0][0])) > 128
    (ll, _), = lm.loglikelihood(_requests(long))
    (ll_ref, _), = hf_lm.loglikelihood(_requests(long))
    assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4)
    assert lm.kept.summary()["avg_kept_fraction"] == 1.0
    assert max(lm.kept.prompt_tokens) < 128  # the context was truncated to max_length + 1 minus the continuation


def test_rolling_loglikelihood_is_refused_with_a_pruner(tiny_llama):
    """HFLM's rolling windows have 1-token contexts: a pruned run would silently equal dense."""
    model, tokenizer, _ = tiny_llama
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(KEEP_ALL, RandomScorer()), max_length=128)
    with pytest.raises(ConfigError, match=r"loglikelihood_rolling[\s\S]*eval=perplexity[\s\S]*eval=continuation"):
        lm.loglikelihood_rolling(_rolling())
    assert lm.kept.summary()["pruned_prefills"] == 0  # refused before any prefill


TASK_YAML = """task: {name}
dataset_path: json
output_type: {output_type}
test_split: train
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def _task_dir(tmp_path):
    """A task folder with a rolling task, a multiple-choice one, a group and a tag over them."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "rolling.yaml").write_text(TASK_YAML.format(name="tiny_rolling", output_type="loglikelihood_rolling")
                                         + "tag: tiny_tag\n")
    (folder / "choice.yaml").write_text(TASK_YAML.format(name="tiny_choice", output_type="multiple_choice"))
    (folder / "group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_choice\n  - tiny_tag\n")
    return folder


def test_rolling_tasks_are_found_through_groups_and_tags(tmp_path):
    folder = str(_task_dir(tmp_path))
    assert rolling_tasks(["tiny_rolling"], folder) == ["tiny_rolling"]
    assert rolling_tasks(["tiny_group"], folder) == ["tiny_rolling"]
    assert rolling_tasks(["tiny_tag", "tiny_choice"], folder) == ["tiny_rolling"]
    assert rolling_tasks(["tiny_choice"], folder) == []


@pytest.mark.parametrize("pruning", ["random", "norm"])
def test_pruned_rolling_task_is_refused_before_loading(tmp_path, pruning):
    overrides = [f"eval.include_path={_task_dir(tmp_path)}", "eval.tasks=[tiny_group]", f"run_dir={tmp_path / 'run'}"]
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", f"pruning={pruning}", *overrides])
    with pytest.raises(ConfigError, match=r"eval.tasks \(tiny_rolling\)[\s\S]*eval=perplexity"):
        evaluate.validate_eval(cfg)
    # Dense rolling log-likelihood stays allowed.
    evaluate.validate_eval(compose("eval", ["eval=lm_eval", "model=tiny-llama", "pruning=none", *overrides]))


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
