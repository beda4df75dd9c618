"""The lm-eval ``sdtp`` model: parity with HFLM when dense, and the pruned-context semantics."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

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
from sdtp.eval import harness
from sdtp.eval.harness import clean_metrics, document_samples, output_types
from sdtp.eval.lm_eval_model import SDTPLM
from sdtp.eval.scoring import prefill_context, score_continuation
from sdtp.kv import CompressedCache, KVCompressor, KVPolicy
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.base import Scorer
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.predictor import PredictorScorer
from sdtp.scorers.random import RandomScorer

pytestmark = pytest.mark.usefixtures("single_thread")

PAIRS = [
    ("The quick brown fox jumps over the lazy", " dog"),
    ("Question: What is the capital of France?\nAnswer:", " Paris is the capital and largest city."),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("", "An empty context is scored after the prefix token."),
    ("In 1492 Columbus sailed the ocean blue, and then " * 6, " he reached the Bahamas"),
]
# Multiple-choice-like requests: contexts of different lengths (one shorter than keep_first + 1, one
# empty: lm-eval's prefix token), several choices each, 1-token and multi-token continuations,
# interleaved so the choices of one context are not adjacent.
QUESTIONS = [
    ("Question: Which animal barks?\nAnswer:", [" dog", " cat that meows all day long", " a"]),
    ("In 1492 Columbus sailed the ocean blue, and then " * 5, [" he reached the Bahamas", " home", " nothing at all"]),
    ("Hi", [" there", " you, how are you doing today?"]),
    ("", ["An empty context is scored after the prefix token.", " x"]),
    ("The quick brown fox jumps over the lazy dog. " * 3 + "What jumps?", [" the fox", " the dog"]),
]
CHOICES = [(ctx, cont) for ctx, conts in QUESTIONS for cont in conts]
CHOICES = CHOICES[1::2] + CHOICES[::2]
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


@pytest.mark.parametrize("batch_size", [1, 3])
def test_engine_path_keeping_everything_matches_hflm(tiny_llama, hf_lm, batch_size):
    """The pruned code path (prefill + continuation on the cache) with nothing pruned = HFLM's dense pass."""
    model, tokenizer, _ = tiny_llama
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(KEEP_ALL, RandomScorer()), max_length=128,
                batch_size=batch_size)
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
    """A task folder with a rolling task, a multiple-choice one, a group and a tag over them, a generation task."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "rolling.yaml").write_text(TASK_YAML.format(name="tiny_rolling", output_type="loglikelihood_rolling")
                                         + "tag: tiny_tag\n")
    (folder / "choice.yaml").write_text(TASK_YAML.format(name="tiny_choice", output_type="multiple_choice"))
    (folder / "group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_choice\n  - tiny_tag\n")
    (folder / "gen.yaml").write_text(TASK_YAML.format(name="tiny_gen", output_type="generate_until"))
    return folder


def test_output_types_are_found_through_groups_and_tags(tmp_path):
    folder = str(_task_dir(tmp_path))
    rolling, choice = {"tiny_rolling": "loglikelihood_rolling"}, {"tiny_choice": "multiple_choice"}
    assert output_types(["tiny_rolling"], folder) == rolling
    assert output_types(["tiny_group"], folder) == {**choice, **rolling}
    assert output_types(["tiny_tag", "tiny_choice"], folder) == {**rolling, **choice}
    assert output_types(["tiny_choice"], folder) == choice


@pytest.mark.parametrize("pruning", ["random", "norm"])
def test_pruned_rolling_task_is_refused_before_loading(tmp_path, pruning):
    overrides = [f"eval.include_path={_task_dir(tmp_path)}", "eval.tasks=[tiny_group]", f"run_dir={tmp_path / 'run'}"]
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", f"pruning={pruning}", *overrides])
    with pytest.raises(ConfigError, match=r"eval.tasks \(tiny_rolling\)[\s\S]*eval=perplexity"):
        evaluate.validate_eval(cfg)
    # Dense rolling log-likelihood stays allowed.
    evaluate.validate_eval(compose("eval", ["eval=lm_eval", "model=tiny-llama", "pruning=none", *overrides]))


def test_pruned_generation_task_with_batch_size_above_one_is_refused_before_loading(tmp_path):
    overrides = [f"eval.include_path={_task_dir(tmp_path)}", "eval.tasks=[tiny_choice,tiny_gen]",
                 f"run_dir={tmp_path / 'run'}"]
    cfg = lambda *extra: compose("eval", ["eval=lm_eval", "model=tiny-llama", *overrides, *extra])
    with pytest.raises(ConfigError, match=r"eval.batch_size=2: pruned generation \(eval.tasks tiny_gen\)"):
        evaluate.validate_eval(cfg("pruning=random", "eval.batch_size=2"))
    evaluate.validate_eval(cfg("pruning=random", "eval.batch_size=1"))
    evaluate.validate_eval(cfg("pruning=none", "eval.batch_size=2"))


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



def _token_requests(lm: SDTPLM, monkeypatch) -> list:
    """The (request, context ids, continuation ids) that lm-eval's ``loglikelihood`` makes of CHOICES."""
    captured: list = []
    with monkeypatch.context() as patch:
        patch.setattr(lm, "_loglikelihood_tokens", lambda reqs, **_: captured.extend(reqs) or [])
        lm.loglikelihood(_requests(CHOICES))
    return captured


def _one_at_a_time(model, lm: SDTPLM, pruner: TokenPruner, monkeypatch) -> list[tuple[float, bool]]:
    """Reference: each request alone, with its own pruned prefill and its continuation on that cache.

    Context + continuation keep their last ``max_length + 1`` tokens, as in HFLM.
    """
    out = []
    for _, context_enc, continuation_enc in _token_requests(lm, monkeypatch):
        context_enc = (context_enc + continuation_enc)[-(lm.max_length + 1):][: -len(continuation_enc)]
        prefilled = prefill_context(model, torch.tensor([context_enc]), pruner)
        logprobs, greedy = score_continuation(model, prefilled, torch.tensor([continuation_enc]), pruner)
        out.append((float(logprobs.sum()), greedy))
    return out


def _deterministic_scorer(kind: str, model) -> Scorer:
    """Scores that do not depend on the batch: hidden-state norms, or an (untrained, seeded) predictor
    with the position features, which read each row's own prompt length."""
    if kind == "norm":
        return HiddenNormScorer()
    torch.manual_seed(0)
    meta = PredictorMeta(hidden_size=model.config.hidden_size, layers=list(PRUNE.layers), position_features=True)
    return PredictorScorer(predictor=TokenPredictor(meta))


@pytest.mark.parametrize("kind", ["norm", "predictor"])
@pytest.mark.parametrize("batch_size", [2, 8])
def test_batched_pruned_loglikelihood_equals_one_at_a_time(tiny, batch_size, kind, monkeypatch):
    """Contexts prefilled together (ragged, each pruned by its budget), all choices scored in one forward
    = every request alone, in request order; one prefill per distinct context; cache hook per request."""
    model, tokenizer, _ = tiny
    scorer = _deterministic_scorer(kind, model)
    pruner = lambda: TokenPruner(PRUNE, scorer)
    single = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=pruner(), max_length=128)
    batched = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=pruner(), max_length=128, batch_size=batch_size)
    hooked: list = []
    batched.cache_hook = SimpleNamespace(add_partial=lambda *args: hooked.append(args))
    reference = _one_at_a_time(model, single, pruner(), monkeypatch)
    ones, many = single.loglikelihood(_requests(CHOICES)), batched.loglikelihood(_requests(CHOICES))
    assert len(many) == len(CHOICES)
    for (ll, greedy), (ll_one, greedy_one), (ll_ref, greedy_ref) in zip(many, ones, reference, strict=True):
        assert ll == pytest.approx(ll_one, rel=1e-5, abs=1e-4) and greedy == greedy_one
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4) and greedy == greedy_ref
    # Hooked in processing order (longest context first), each request once with its own answer.
    expected = [("loglikelihood", pair, answer) for pair, answer in zip(CHOICES, many)]
    assert sorted(hooked, key=repr) == sorted(expected, key=repr)
    # One prefill per distinct (truncated) context: choices share theirs, truncation may split them.
    assert batched.kept.summary()["pruned_prefills"] == single.kept.summary()["pruned_prefills"] < len(CHOICES)
    assert batched.kept.summary() == pytest.approx(single.kept.summary())
    assert batched.kept.summary()["avg_kept_fraction"] < 0.6


def test_batched_keep_all_equals_dense_hflm(tiny):
    """Keep ratio 1.0 through the batched pruned path (padded contexts, shared choices) = dense HFLM."""
    model, tokenizer, _ = tiny
    dense = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128).loglikelihood(_requests(CHOICES))
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(KEEP_ALL, HiddenNormScorer()),
                max_length=128, batch_size=4)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(lm.loglikelihood(_requests(CHOICES)), dense, strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4) and greedy == greedy_ref
    assert lm.kept.summary()["avg_kept_fraction"] == 1.0


def test_batch_size_limits_with_a_pruner(tiny_llama):
    """Pruned generation stays one prompt at a time (refused up front); ``auto`` has no pruned meaning."""
    model, tokenizer, _ = tiny_llama
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(PRUNE, RandomScorer()), max_length=128,
                batch_size=2)
    request = Instance("generate_until", doc={}, idx=0, arguments=("Once upon", {"until": ["\n"], "max_gen_toks": 2}))
    with pytest.raises(ConfigError, match="generate_until.*batch_size=2.*one prompt at a time"):
        lm.generate_until([request])
    assert lm.kept.summary()["pruned_prefills"] == 0
    with pytest.raises(ConfigError, match="batch_size=auto"):
        SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(PRUNE, RandomScorer()), batch_size="auto")


def _decoded_one_by_one(model, lm: SDTPLM, pruner: TokenPruner | None, monkeypatch) -> list[tuple[float, bool]]:
    """Reference for a KV policy: each request alone, its context prefilled (pruned) and compressed by the
    installed hooks, the continuation then *decoded token by token* on the compressed cache (the
    generation path, which needs no mask), log-probs summed."""
    out = []
    for _, context_enc, continuation_enc in _token_requests(lm, monkeypatch):
        context_enc = (context_enc + continuation_enc)[-(lm.max_length + 1):][: -len(continuation_enc)]
        with pruner(model) if pruner is not None else nullcontext():
            prefill = model(input_ids=torch.tensor([context_enc]), use_cache=True)
            cache, logits = output_cache(prefill), [prefill.logits[:, -1]]
            assert isinstance(cache, CompressedCache)
            for i, token in enumerate(continuation_enc[:-1]):
                step = model(input_ids=torch.tensor([[token]]), **cache_kwargs(cache), use_cache=True,
                             position_ids=torch.tensor([[len(context_enc) + i]]))
                logits.append(step.logits[:, -1])
        logprobs = torch.log_softmax(torch.cat(logits), dim=-1)
        targets = torch.tensor(continuation_enc)
        out.append((float(logprobs[torch.arange(len(targets)), targets].sum()),
                    bool((logprobs.argmax(-1) == targets).all())))
    return out


@pytest.mark.parametrize("method", ["h2o", "streaming", "snapkv"])
@pytest.mark.parametrize("pruned", [False, True])
def test_kv_policy_scores_every_request_on_its_compressed_cache(tiny, hf_lm, method, pruned, monkeypatch):
    """kv=...: the context is prefilled (pruned) and compressed, the continuation scored on that cache; = decoding
    the continuation token by token after the same prefill; the compression changes the scores."""
    model, tokenizer, _ = tiny
    policy = KVPolicy(method, ratio=0.4, window=4)
    pruner = TokenPruner(PRUNE, HiddenNormScorer()) if pruned else None
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=pruner, kv_policy=policy, max_length=128, batch_size=4)
    with KVCompressor(policy)(model) as press:
        ours = lm.loglikelihood(_requests(CHOICES))
        prefills = press.entries_before
        reference = _decoded_one_by_one(model, lm, pruner, monkeypatch)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, reference, strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-4, abs=1e-4) and greedy == greedy_ref
    dense = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=128).loglikelihood(_requests(CHOICES))
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(ours, dense))
    # One compressed prefill per distinct context (choices share it), not one per request.
    contexts = {tuple((c + t)[-(lm.max_length + 1):][: -len(t)]) for _, c, t in _token_requests(lm, monkeypatch)}
    if pruned:
        assert lm.kept.summary()["pruned_prefills"] == len(contexts)
    else:
        assert prefills == sum(len(c) for c in contexts) * model.config.num_hidden_layers
    assert press.kept_fraction is not None and press.kept_fraction < 0.75


def test_kv_ratio_one_equals_dense_hflm(tiny_llama, hf_lm):
    """Keeping the whole cache through the KV path (prefill, continuation block on the cache) = HFLM's dense pass."""
    model, tokenizer, _ = tiny_llama
    policy = KVPolicy("h2o", ratio=1.0)
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, kv_policy=policy, max_length=128, batch_size=3)
    with KVCompressor(policy)(model):
        ours = lm.loglikelihood(_requests(CHOICES))
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, hf_lm.loglikelihood(_requests(CHOICES)), strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4) and greedy == greedy_ref


def test_kv_policy_without_its_hooks_is_an_error(tiny_llama):
    """An adapter told about a KV policy refuses to score an uncompressed cache (hooks not installed)."""
    model, tokenizer, _ = tiny_llama
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, kv_policy=KVPolicy("h2o"), max_length=128)
    with pytest.raises(RuntimeError, match="not compressed"):
        lm.loglikelihood(_requests(PAIRS[:1]))
    with pytest.raises(ConfigError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling(_rolling())


def test_kv_with_lm_eval_is_validated_before_loading(tmp_path):
    """sdtp-eval eval=lm_eval accepts kv=... (scored on the compressed cache) but refuses rolling tasks with it."""
    overrides = ["eval=lm_eval", "model=tiny-llama", "kv=h2o", f"eval.include_path={_task_dir(tmp_path)}",
                 f"run_dir={tmp_path / 'run'}"]
    evaluate.validate_eval(compose("eval", [*overrides, "eval.tasks=[tiny_choice]"]))
    with pytest.raises(ConfigError, match="kv=h2o"):
        evaluate.validate_eval(compose("eval", [*overrides, "eval.tasks=[tiny_rolling]"]))


def test_model_args_pretrained_folder_with_override_syntax_in_its_path(tiny_llama, tmp_path):
    """``--model_args pretrained=<folder>``: a folder named like a sweep job (``seed=0,x``) loads, not a parse error."""
    from sdtp.eval.lm_eval_model import load_from_config

    model, tokenizer, _ = tiny_llama
    folder = tmp_path / "seed=0,x" / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, _, pruner, cfg = load_from_config("tiny-llama", "none", None, str(folder))
    assert cfg.model.hf_id == str(folder) and pruner is None
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_model_args_pruning_none_is_the_dense_config():
    """lm-eval's arg parser turns ``pruning=none`` into None: that still names the dense config, not 'pruning/None'."""
    lm = SDTPLM.create_from_arg_string("model=tiny-llama,pruning=none", {"batch_size": 1, "device": None})
    assert lm.pruner is None and lm.max_length == int(compose("eval", ["model=tiny-llama"]).model.max_length)


def test_generation_with_a_kv_policy_needs_its_hooks(tiny_llama, hf_lm):
    """As log-likelihood requests, generation refuses to run on a cache the policy's hooks are not there to compress."""
    model, tokenizer, _ = tiny_llama
    policy = KVPolicy("h2o", ratio=0.2, window=4)
    lm = SDTPLM(pretrained=model, tokenizer=tokenizer, kv_policy=policy, max_length=128)
    prompt = "Once upon a time there was a tiny model that " * 4
    request = lambda: [Instance("generate_until", doc={}, idx=0,
                                arguments=(prompt, {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False}))]
    with pytest.raises(RuntimeError, match="kv=h2o: 1 generate_until request.*not compressed"):
        lm.generate_until(request())
    with KVCompressor(policy)(model) as press:
        assert isinstance(lm.generate_until(request())[0], str)
    assert press.kept_fraction is not None and press.kept_fraction < 0.5  # the prompt's cache was compressed
    assert not KVCompressor.installed_on(model)  # and the hooks left with the block


def test_keep_all_pruner_under_mixed_precision_equals_dense_hflm(tiny_llama):
    """HFLM's ``mixed_precision_dtype`` autocasts its forwards; the pruned path's prefill and continuation
    forwards run under the same autocast, so keeping every token they score as HFLM does (not in float32)."""
    model, tokenizer, _ = tiny_llama
    mixed = {"max_length": 128, "batch_size": 3, "mixed_precision_dtype": "bfloat16"}
    dense = HFLM(pretrained=model, tokenizer=tokenizer, **mixed).loglikelihood(_requests())
    keep_all = SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=TokenPruner(KEEP_ALL, HiddenNormScorer()), **mixed)
    ours = keep_all.loglikelihood(_requests())
    in_bf16 = lambda x: torch.tensor(x).to(torch.bfloat16).item() == x
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, dense, strict=True):
        assert ll == pytest.approx(ll_ref, rel=1e-2, abs=1e-2) and greedy == greedy_ref
        # Autocast logits are bfloat16, so is HFLM's log-softmax of them and its sum: float32 forwards would
        # give sums bfloat16 cannot hold, which the tolerance above would not catch.
        assert in_bf16(ll) and in_bf16(ll_ref)


DATA_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
test_split: train
doc_to_text: "{{{{q}}}}"
"""
CHOICE_TASK = """output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""
# Two filters of one generation: "keep" (the generated text: never "[invalid]") and "const" (a regex that never
# matches, whose fallback is "[invalid]": always right), so their exact_match differ: 0 and 1.
TWO_FILTER_TASK = """output_type: generate_until
doc_to_target: "[invalid]"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
filter_list:
  - name: keep
    filter:
      - function: take_first
  - name: const
    filter:
      - function: regex
        regex_pattern: "(zzz)"
      - function: take_first
"""


def _data_task_dir(tmp_path):
    """Tasks with 6 documents each: tiny_gen (two filters), tiny_choice, tiny_choice2 (tag tiny_tag), and the group
    tiny_group of tiny_choice and the tag."""
    folder = tmp_path / "data_tasks"
    folder.mkdir()
    data = folder / "data.jsonl"
    data.write_text("".join(f'{{"q": "Question {i}: pick", "choices": [" a", " b"], "label": {i % 2}}}\n'
                            for i in range(6)))
    task = lambda name, body: DATA_TASK_YAML.format(name=name, data=data) + body
    (folder / "gen.yaml").write_text(task("tiny_gen", TWO_FILTER_TASK))
    (folder / "choice.yaml").write_text(task("tiny_choice", CHOICE_TASK))
    (folder / "choice2.yaml").write_text(task("tiny_choice2", CHOICE_TASK) + "tag: tiny_tag\n")
    (folder / "group.yaml").write_text("group: tiny_group\ntask:\n  - tiny_choice\n  - tiny_tag\n")
    return folder


def _lm_eval_cfg(tmp_path, tasks: str, limit: str):
    return compose("eval", ["eval=lm_eval", "model=tiny-llama", "pruning=none", "eval.num_fewshot=0",
                            f"eval.include_path={_data_task_dir(tmp_path)}", f"eval.tasks={tasks}",
                            f"eval.limit={limit}", "eval.checkpoint=false", f"run_dir={tmp_path / 'run'}"])


def test_metric_names_keep_every_filter_but_none():
    results = {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "acc_norm,none": 1, "flag,none": True,
               "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
               "exact_match,flexible-extract": 0.75}
    assert clean_metrics(results) == {"acc": 0.5, "acc_norm": 1.0, "exact_match/strict-match": 0.25,
                                      "exact_match_stderr/strict-match": 0.1, "exact_match/flexible-extract": 0.75}


def test_task_with_two_filters_reports_both(tiny_llama, tmp_path):
    """lm-eval scores a generation once per filter: metrics.json keeps one number per filter (the last no longer
    overwrites the others) and samples_<task>.jsonl says which filter each row of a document is."""
    model, tokenizer, _ = tiny_llama
    cfg = _lm_eval_cfg(tmp_path, "[tiny_gen]", "3")
    (tmp_path / "run").mkdir()
    out = harness.run(cfg, model, tokenizer, None, tmp_path / "run")
    assert {k: v for k, v in out["tasks"]["tiny_gen"].items() if k.startswith("exact_match")} == {
        "exact_match/keep": 0.0, "exact_match/const": 1.0}  # (stderr: none, eval.bootstrap_iters is 0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples_tiny_gen.jsonl").read_text().splitlines()]
    assert sorted((row["doc_id"], row["filter"]) for row in rows) == [
        (doc, name) for doc in range(3) for name in ("const", "keep")]
    assert {row["resps"][0] for row in rows if row["filter"] == "const"} == {"[invalid]"}


def test_per_task_limit_of_a_group_or_tag_limits_each_of_its_tasks(tiny_llama, tmp_path):
    """eval.limit={group or tag: n} limits each of its tasks (lm-eval's samples name tasks only); a task named
    itself keeps its own limit; two different limits for one task are refused."""
    from lm_eval.tasks import TaskManager

    model, tokenizer, _ = tiny_llama
    cfg = _lm_eval_cfg(tmp_path, "[tiny_group]", "{tiny_group: 2}")
    harness.validate(cfg)
    (tmp_path / "run").mkdir()
    out = harness.run(cfg, model, tokenizer, None, tmp_path / "run")
    assert out["n_samples"] == {"tiny_choice": 2, "tiny_choice2": 2}
    manager = TaskManager(include_path=str(cfg.eval.include_path))
    assert document_samples({"tiny_tag": 3}, manager) == {"tiny_choice2": [0, 1, 2]}
    assert document_samples({"tiny_group": 2, "tiny_choice": None}, manager) == {"tiny_choice2": [0, 1]}
    assert document_samples({"tiny_group": 2, "tiny_tag": 3, "tiny_choice2": 9}, manager) == {
        "tiny_choice": [0, 1], "tiny_choice2": list(range(6))}
    with pytest.raises(ConfigError, match=r"tiny_choice2 gets different limits \[2, 3\]"):
        document_samples({"tiny_group": 2, "tiny_tag": 3}, manager)


def test_sdtp_lm_eval_refuses_per_rank_request_caches():
    from sdtp.distributed import World

    for argv in (["sdtp-lm-eval", "--use_cache", "cache/x"], ["sdtp-lm-eval", "--use_cache=cache/x"]):
        with pytest.raises(ConfigError, match="single-process only"):
            harness.refuse_rank_caches(argv, World(rank=1, size=2))
        harness.refuse_rank_caches(argv, World())  # one process: lm-eval's cache is fine
    harness.refuse_rank_caches(["sdtp-lm-eval", "--tasks", "sdtp_copa"], World(rank=0, size=2))
