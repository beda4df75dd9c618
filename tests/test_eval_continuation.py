"""Continuation protocol: segment tiling, token streams, keep-all = dense, the runner's resume, KV policies."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sdtp.cli.evaluate import run as eval_run
from sdtp.cli.evaluate import validate_eval
from sdtp.config import compose
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.eval import continuation
from sdtp.eval.continuation import SEGMENTS_FILE, jsonl_stream, segment_nll, segments, segments_sha256
from sdtp.kv import KVCompressor, build_kv_policy
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.random import RandomScorer

pytestmark = pytest.mark.usefixtures("single_thread")

KEEP_ALL = PruningSchedule(layers=(1, 2, 3), keep_fractions=(1.0, 1.0, 1.0))
PRUNE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.7, 0.5, 0.35))


def test_segments_tile_the_stream_without_overlap():
    stream = torch.arange(103)
    segs = segments(stream, context_len=10, cont_len=5, num_segments=6)
    assert all(c.shape == (1, 10) and t.shape == (1, 5) for c, t in segs)
    tiled = torch.cat([torch.cat([c, t], dim=1) for c, t in segs], dim=1)[0]
    assert torch.equal(tiled, stream[:90])  # contiguous from the start, each token used once
    with pytest.raises(ConfigError, match="eval.num_segments.*only 6"):
        segments(stream, 10, 5, 7)
    assert segments_sha256(segs) != segments_sha256(segments(stream, 11, 4, 6))  # same tokens, other split


def test_jsonl_stream_selects_documents_and_joins_with_eos(tiny_llama, tmp_path):
    _, tokenizer, _ = tiny_llama
    docs = ["zero doc", "first doc", "second one", "third"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "url": "u"}) + "\n" for d in docs) + "\n")
    ids = jsonl_stream(path, tokenizer, doc_start=1, doc_end=3).tolist()
    expect = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    assert ids == expect(docs[1]) + [tokenizer.eos_token_id] + expect(docs[2])
    with pytest.raises(ConfigError, match="eval.doc_start/eval.doc_end"):
        jsonl_stream(path, tokenizer, doc_start=2, doc_end=9)


def test_keep_all_equals_dense_and_pruning_differs(tiny_llama):
    model, _, _ = tiny_llama
    stream = torch.randint(4, 260, (300,), generator=torch.Generator().manual_seed(0))
    segs = segments(stream, context_len=80, cont_len=16, num_segments=3)
    dense = segment_nll(model, segs, None)
    kept = segment_nll(model, segs, TokenPruner(KEEP_ALL, RandomScorer()))
    assert [s.nll for s in kept] == pytest.approx([s.nll for s in dense], rel=1e-5)
    assert all(s.kept_fraction == 1.0 and s.layer_fraction == 1.0 for s in dense + kept)
    pruned = segment_nll(model, segs, TokenPruner(PRUNE, HiddenNormScorer()))
    assert [s.nll for s in pruned] != pytest.approx([s.nll for s in dense], rel=1e-4)
    assert all(s.kept_fraction == pytest.approx(0.35, abs=0.02) for s in pruned)


def _cfg(tmp_path, *overrides):
    text = tmp_path / "wiki.test.raw"
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 40)
    return compose("eval", ["eval=continuation", "model=tiny-llama", f"eval.data_file={text}", "eval.context_len=96",
                            "eval.cont_len=16", "eval.num_segments=5", *overrides])


def test_runner_resumes_from_a_partial_segments_file(tiny_llama, tmp_path, monkeypatch):
    model, tokenizer, _ = tiny_llama
    cfg = _cfg(tmp_path, "pruning=norm")
    pruner = TokenPruner(PRUNE, HiddenNormScorer())  # deterministic, so a resumed run must match exactly
    full = continuation.run(cfg, model, tokenizer, pruner, tmp_path / "full")
    lines = (tmp_path / "full" / SEGMENTS_FILE).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == list(range(5)) and full["segments"] == 5
    # An interrupted run: two finished segments, one from another configuration, and a torn last line.
    stale = json.dumps({**json.loads(lines[2]), "fp": "another-config", "nll": 99.0})
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / SEGMENTS_FILE).write_text("\n".join([lines[0], lines[1], stale, lines[3][:20]]))
    calls, real = [], continuation.score_segment
    monkeypatch.setattr(continuation, "score_segment", lambda *a: calls.append(1) or real(*a))
    resumed = continuation.run(cfg, model, tokenizer, pruner, tmp_path / "resumed")
    assert len(calls) == 3 and resumed == full  # same floats: the 2 saved segments + 3 recomputed
    records = [json.loads(line) for line in (tmp_path / "resumed" / SEGMENTS_FILE).read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(5))  # torn and stale lines are gone


def test_validation_names_the_key(tmp_path):
    for override, key in (("eval.context_len=0", "eval.context_len"),
                          ("eval.data_file=/no/such/file", "eval.data_file"),
                          ("eval.dataset=books", "eval.dataset"), ("eval.context_len=5000", "eval.context_len"),
                          ("pruning.keep_recent=1.5", "pruning.keep_recent")):
        with pytest.raises(ConfigError, match=key):
            validate_eval(_cfg(tmp_path, "pruning=random", override))


def test_sdtp_eval_discovers_the_runner(tmp_path):
    cfg = _cfg(tmp_path, "pruning=random", f"run_dir={tmp_path / 'run'}", "eval.num_segments=2")
    metrics = eval_run(cfg)
    assert metrics["results"]["segments"] == 2 and metrics["avg_kept_fraction"] < 1.0
    assert metrics["results"]["ppl"] == pytest.approx(2.718281828 ** metrics["results"]["nll"])


def _multi_news(tmp_path, n=3):
    path = tmp_path / "multi_news.jsonl"
    rows = [{"input": "", "context": f"Passage {i}: " + "news about the town council and its budget. " * (30 + 20 * i),
             "answers": [f"The council {i} approved a budget after a long debate."], "length": 100}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_longbench_segments_are_truncated_prompts_and_gold_answers(tiny_llama, tmp_path):
    """One segment per record: the task prompt middle-truncated to context_len (+ chat template), the
    continuation the first cont_len tokens of the gold answer (after a bare "Summary:", with a space, as the
    text would continue); too few records is a clear error."""
    from sdtp.eval.longbench import build_input, truncate_middle
    from sdtp.eval.longbench_tasks import DATASETS as TASKS

    _, tokenizer, _ = tiny_llama
    path = _multi_news(tmp_path)
    segs = continuation.longbench_segments(path, "multi_news", tokenizer, context_len=120, cont_len=6,
                                           num_segments=3, chat=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for (ctx, cont), record in zip(segs, records):
        expect_ctx, truncated = build_input(tokenizer, TASKS["multi_news"], record, 120, False)
        assert truncated and torch.equal(ctx, expect_ctx) and ctx.shape[1] <= 121  # + BOS at most
        prompt, _ = truncate_middle(tokenizer, TASKS["multi_news"].prompt.format(**record), 120)
        assert prompt.endswith("Summary:") and record["answers"][0].startswith("The")
        joint = tokenizer(prompt + " " + record["answers"][0]).input_ids
        assert torch.cat([ctx[0], cont[0]]).tolist() == joint[: ctx.shape[1] + 6]
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    chat = continuation.longbench_segments(path, "multi_news", templated, 120, 6, 3, chat=True)
    for (_, cont), record in zip(chat, records):  # the reply starts the assistant turn: no space
        assert cont[0].tolist() == tokenizer(record["answers"][0], add_special_tokens=False).input_ids[:6]
    with pytest.raises(ConfigError, match="eval.num_segments.*only 3"):
        continuation.longbench_segments(path, "multi_news", tokenizer, 120, 6, 4, chat=False)


def test_sdtp_eval_scores_longbench_answers(tmp_path):
    path = _multi_news(tmp_path)
    cfg = _cfg(tmp_path, "pruning=random", f"run_dir={tmp_path / 'run'}", "eval.dataset=longbench",
               f"eval.data_file={path}", "eval.num_segments=3", "eval.context_len=120", "eval.cont_len=6")
    metrics = eval_run(cfg)
    assert metrics["results"]["segments"] == 3 and metrics["results"]["task"] == "multi_news"
    with pytest.raises(ConfigError, match="eval.task"):
        validate_eval(_cfg(tmp_path, "eval.dataset=longbench", f"eval.data_file={path}", "eval.task=nope"))


@pytest.mark.parametrize("scorer", [None, HiddenNormScorer], ids=["dense", "norm"])
def test_batched_segments_equal_one_at_a_time(tiny_llama, scorer):
    model, _, _ = tiny_llama
    generator = torch.Generator().manual_seed(4)
    stream = torch.randint(4, 260, (400,), generator=generator)
    equal = segments(stream, context_len=80, cont_len=16, num_segments=3)
    # Ragged, as LongBench segments are: contexts and continuations of different lengths.
    ragged = [(torch.randint(4, 260, (1, n), generator=generator), torch.randint(4, 260, (1, t), generator=generator))
              for n, t in ((90, 7), (57, 12), (73, 1))]
    for segs in (equal, ragged):
        pruner = (lambda: TokenPruner(PRUNE, scorer())) if scorer else (lambda: None)
        one = segment_nll(model, segs, pruner())
        seen = []
        two = segment_nll(model, segs, pruner(), batch_size=2, on_segment=lambda i, s: seen.append(i))
        assert seen == [0, 1, 2]
        assert [s.nll for s in two] == pytest.approx([s.nll for s in one], abs=1e-5)
        assert [s.kept_fraction for s in two] == [s.kept_fraction for s in one]
        assert [s.layer_fraction for s in two] == pytest.approx([s.layer_fraction for s in one], abs=1e-12)


def test_runner_batch_size_key(tiny_llama, tmp_path):
    model, tokenizer, _ = tiny_llama
    one = continuation.run(_cfg(tmp_path, "pruning=norm"), model, tokenizer, TokenPruner(PRUNE, HiddenNormScorer()),
                           tmp_path / "one")
    two = continuation.run(_cfg(tmp_path, "pruning=norm", "eval.batch_size=2"), model, tokenizer,
                           TokenPruner(PRUNE, HiddenNormScorer()), tmp_path / "two")
    assert two["segments"] == one["segments"] == 5
    assert two["nll"] == pytest.approx(one["nll"], abs=1e-5)
    assert two["avg_kept_fraction"] == one["avg_kept_fraction"] < 1.0
    with pytest.raises(ConfigError, match="eval.batch_size"):
        continuation.validate(_cfg(tmp_path, "eval.batch_size=0"))


def _decoded_on_compressed_cache(model, segs, policy) -> list[float]:
    """Mean NLL of each segment's continuation fed token by token after a compressed prefill (the decode path)."""
    nlls = []
    with KVCompressor(policy)(model):
        for ctx_ids, cont_ids in segs:
            out = model(ctx_ids, use_cache=True)
            logits, cache = [out.logits[:, -1]], output_cache(out)
            for token in cont_ids[0, :-1]:
                out = model(token.view(1, 1), **cache_kwargs(cache), use_cache=True)
                logits.append(out.logits[:, -1])
                cache = output_cache(out)
            nlls.append(float(torch.nn.functional.cross_entropy(torch.cat(logits).float(), cont_ids[0])))
    return nlls


@pytest.mark.parametrize("method", ["h2o", "snapkv", "streaming"])
@torch.no_grad()
def test_kv_policy_scores_the_continuation_on_the_compressed_cache(tiny_llama, tmp_path, method):
    """sdtp-eval eval=continuation kv=...: each segment's continuation is scored (one block) on its context's
    compressed cache, = decoding it token by token from that cache; kv.ratio=1.0 reproduces dense."""
    model, tokenizer, _ = tiny_llama
    window = ["kv.window=8"] if method == "snapkv" else []
    cfg = _cfg(tmp_path, "pruning=none", f"kv={method}", *window, f"run_dir={tmp_path / method}")
    metrics = eval_run(cfg)
    segs, _ = continuation.build_segments(cfg.eval, tokenizer)
    records = [json.loads(line) for line in (tmp_path / method / SEGMENTS_FILE).read_text().splitlines()]
    reference = _decoded_on_compressed_cache(model, segs, build_kv_policy(cfg))
    assert [r["nll"] for r in sorted(records, key=lambda r: r["id"])] == pytest.approx(reference, rel=1e-4)
    assert metrics["kv"]["method"] == method and metrics["kv"]["kept_fraction"] == pytest.approx(0.4, abs=0.02)
    dense = eval_run(_cfg(tmp_path, "pruning=none", f"run_dir={tmp_path / 'dense'}"))["results"]["nll"]
    assert metrics["results"]["nll"] != pytest.approx(dense, abs=1e-5)  # the tiny model attends almost uniformly
    whole = eval_run(_cfg(tmp_path, "pruning=none", f"kv={method}", "kv.ratio=1.0", "kv.keep_recent=0",
                          f"run_dir={tmp_path / 'whole'}"))
    assert whole["results"]["nll"] == pytest.approx(dense, rel=1e-5) and whole["kv"]["kept_fraction"] == 1.0


def test_kv_runs_do_not_resume_from_dense_segments(tmp_path):
    """A KV policy is part of a segment's fingerprint (a run dir reused with kv=... recomputes), kv=none is not
    (segment files written before KV support stay valid); a batch is refused, as it would pad the budgets."""
    segs_sha = "0" * 64
    dense = continuation.fingerprint(_cfg(tmp_path, "pruning=none"), segs_sha)
    assert dense == continuation.fingerprint(_cfg(tmp_path, "pruning=none", "kv=none"), segs_sha)
    assert continuation.fingerprint(_cfg(tmp_path, "pruning=none", "kv=h2o"), segs_sha) != dense
    with pytest.raises(ConfigError, match="eval.batch_size=1"):
        continuation.validate(_cfg(tmp_path, "pruning=none", "kv=h2o", "eval.batch_size=2"))


def test_kv_policy_composes_with_a_pruned_prefill(tmp_path):
    """pruning=norm kv=h2o: the policy cuts what the pruned prefill left (40% of it) and changes the numbers."""
    pruned = eval_run(_cfg(tmp_path, "pruning=norm", f"run_dir={tmp_path / 'pruned'}"))
    both = eval_run(_cfg(tmp_path, "pruning=norm", "kv=h2o", f"run_dir={tmp_path / 'both'}"))
    assert both["kv"]["kept_fraction"] == pytest.approx(0.4, abs=0.03)
    assert both["avg_kept_fraction"] == pruned["avg_kept_fraction"] < 1.0
    assert both["results"]["nll"] != pytest.approx(pruned["results"]["nll"], abs=1e-5)


def test_the_runner_refills_and_fingerprints_it(tiny_llama, tmp_path):
    model, tokenizer, _ = tiny_llama
    cfg = _cfg(tmp_path, "pruning=norm", "+pruning.refill=true")
    continuation.validate(cfg)
    validate_eval(cfg)
    pruner = TokenPruner(PRUNE, HiddenNormScorer())
    result = continuation.run(cfg, model, tokenizer, pruner, tmp_path / "run")
    assert result["avg_layer_token_fraction"] == 1.0 and result["avg_cache_fraction"] < 1.0
    assert result["flops"] == continuation.schedule_flops(model, 96, None)  # the cache comes from a dense prefill
    plain = _cfg(tmp_path, "pruning=norm")
    assert continuation.fingerprint(cfg, "x") != continuation.fingerprint(plain, "x")
    assert "avg_cache_fraction" not in continuation.run(plain, model, tokenizer, pruner, tmp_path / "plain")


@pytest.mark.parametrize("overrides, match", [
    (("pruning=none", "+pruning.refill=true"), "needs a pruning method"),
    (("pruning=norm", "+pruning.refill=true", "kv=h2o"), "no kv policy"),
    (("pruning=norm", "+pruning.refill=true", "eval.batch_size=2"), "eval.batch_size=1"),
])
def test_bad_refill_configs_fail_before_work(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        continuation.validate(_cfg(tmp_path, *overrides))


def test_only_the_continuation_runner_refills(tmp_path):
    cfg = compose("eval", ["eval=perplexity", "model=tiny-llama", "pruning=norm", "+pruning.refill=true"])
    with pytest.raises(ConfigError, match="only eval=continuation refills"):
        validate_eval(cfg)
