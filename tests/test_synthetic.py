"""Synthetic long-context tasks: deterministic generation, gold answers score 1.0, task invariants, CLI run."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from sdtp.config import compose
from sdtp.errors import ConfigError
from sdtp.eval import synthetic
from sdtp.eval.synthetic_data import make_samples, score, wiki_paragraphs

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    """A small WikiText-format file: 8 articles x 5 paragraphs of distinct sentences."""
    rng = random.Random(0)
    lines = []
    for article in range(8):
        lines += [" ", f" = Article {article} = ", " "]
        for para in range(5):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(10)) + f" a{article}p{para}s{s} ." for s in range(5)]
            lines.append(" " + " ".join(sentences) + " ")
    path = tmp_path_factory.mktemp("wiki") / "wiki.test.raw"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("task", ["needle", "passage_retrieval", "passage_count"])
def test_generation_is_deterministic_and_gold_scores_one(task, wiki, tiny_llama):
    _, tokenizer, _ = tiny_llama
    args = (task, tokenizer, wiki, [1200, 2000], [0.0, 0.5, 1.0], 2)
    first, again, other = make_samples(*args, seed=0), make_samples(*args, seed=0), make_samples(*args, seed=1)
    assert [(s.id, s.prompt, s.answer) for s in first] == [(s.id, s.prompt, s.answer) for s in again]
    assert [s.prompt for s in first] != [s.prompt for s in other]
    assert len(first) == (12 if task == "needle" else 4)
    for sample in first:
        gold = f"Paragraph {sample.answer[len('Paragraph '):]}" if task == "passage_retrieval" else sample.answer
        assert score(task, gold, sample.answer) == 1.0
        assert score(task, "I do not know", sample.answer) == 0.0
        tokens = len(tokenizer(sample.prompt + sample.answer_prefix).input_ids)
        assert 0.75 * sample.length <= tokens <= sample.length + 20


def test_needle_is_placed_at_the_requested_depth(wiki, tiny_llama):
    _, tokenizer, _ = tiny_llama
    for sample in make_samples("needle", tokenizer, wiki, [2000], [0.0, 0.5, 1.0], 1, seed=3):
        needle = f"The special magic number for {sample.meta['key']} is {sample.answer}."
        assert sample.prompt.count(sample.answer) == 1 and needle in sample.prompt
        body = sample.prompt.split("\n\n")[1]  # the filler with the needle line
        where = body.index(needle) / len(body)
        assert abs(where - sample.meta["depth"]) < 0.2
        assert sample.meta["key"] in sample.answer_prefix


def _blocks(prompt: str) -> dict[int, str]:
    return {int(n): text for n, text in re.findall(r"Paragraph (\d+): (.*)", prompt)}


def test_passage_tasks_answers_match_their_contexts(wiki, tiny_llama):
    _, tokenizer, _ = tiny_llama
    for sample in make_samples("passage_count", tokenizer, wiki, [1500, 2500], [], 3, seed=0):
        blocks = _blocks(sample.prompt)
        assert len(blocks) == sample.meta["num_paragraphs"] and str(len(set(blocks.values()))) == sample.answer
    for sample in make_samples("passage_retrieval", tokenizer, wiki, [1500, 2500], [], 3, seed=0):
        blocks = _blocks(sample.prompt)
        query = sample.prompt.split("The following is the sentence.\n\n")[1].split("\n\n")[0]
        holders = [n for n, text in blocks.items() if query in text]
        assert [f"Paragraph {n}" for n in holders] == [sample.answer]


def test_wiki_parser_drops_headings(wiki):
    paragraphs = wiki_paragraphs(wiki)
    assert len(paragraphs) == 40 and {p.article for p in paragraphs} == set(range(8))
    assert not any("=" in p.text for p in paragraphs) and paragraphs[0].text.endswith(".")


def test_bad_settings_are_config_errors(wiki):
    base = ["eval=needle", "model=tiny-llama", f"eval.source={wiki}", "eval.lengths=[1024]"]
    for override, key in [("eval.depths=[1.5]", "eval.depths"), ("eval.lengths=[100000]", "eval.lengths"),
                          ("eval.task=nope", "eval.task"), ("eval.source=/nonexistent", "eval.source")]:
        with pytest.raises(ConfigError, match=key):
            synthetic.validate(compose("eval", [*base, override]))


@pytest.mark.parametrize("task", ["needle", "passage_count"])
def test_cli_run_writes_scored_predictions(task, wiki, tmp_path, capsys):
    from sdtp.cli.evaluate import run

    depths = ["eval.depths=[0.5]"] if task == "needle" else []
    metrics = run(compose("eval", [f"eval={task}", "model=tiny-llama", "pruning=random", f"eval.source={wiki}",
                                   "eval.lengths=[600]", *depths, "eval.num_samples=2", "eval.max_new_tokens=3",
                                   f"run_dir={tmp_path}"]))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["new_tokens"] <= 3 and r["kept_fraction"] < 1.0 for r in rows)
    assert metrics["results"]["score"] == round(100 * sum(r["score"] for r in rows) / 2, 2)
    assert (tmp_path / "metrics.json").is_file()


def test_kv_compression_in_a_generation_eval(wiki, tmp_path):
    """kv=... compresses every prefill of the run: ratio 1.0 changes nothing, 0.4 keeps ~40% of the cache."""
    from sdtp.cli.evaluate import run

    def evaluate(name: str, *kv: str) -> tuple[dict, list[dict]]:
        out = tmp_path / name
        metrics = run(compose("eval", ["eval=needle", "model=tiny-llama", "pruning=random", f"eval.source={wiki}",
                                       "eval.lengths=[400]", "eval.depths=[0.5]", "eval.num_samples=2",
                                       "eval.max_new_tokens=4", f"run_dir={out}", *kv]))
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        return metrics, rows

    plain, plain_rows = evaluate("none")
    lossless, lossless_rows = evaluate("full", "kv=h2o", "kv.ratio=1.0")
    compressed, _ = evaluate("h2o", "kv=snapkv", "kv.ratio=0.4", "kv.window=8")
    assert plain["kv"] == {"method": "none", "ratio": 1.0, "kept_fraction": 1.0}
    assert [r["pred"] for r in lossless_rows] == [r["pred"] for r in plain_rows]
    assert lossless["kv"]["method"] == "h2o" and lossless["kv"]["kept_fraction"] == 1.0
    assert compressed["kv"]["method"] == "snapkv" and 0.38 < compressed["kv"]["kept_fraction"] < 0.45


def test_needles_stay_outside_the_protected_spans_at_every_depth(wiki, tiny_llama):
    """Depth 1.0 used to sit inside the last 10% that every pruner keeps (a free score floor)."""
    _, tokenizer, _ = tiny_llama
    for length in (600, 1200, 2000):
        samples = make_samples("needle", tokenizer, wiki, [length], [0.0, 0.5, 1.0], 2, seed=0)
        spans = [synthetic.needle_span(tokenizer, s, chat=False) for s in samples]
        for (first, end, n), sample in zip(spans, samples):
            assert first >= 4 and end <= n - math.ceil(0.1 * n), (sample.id, first, end, n)
        by_depth = {d: [f for (f, _, _), s in zip(spans, samples) if s.meta["depth"] == d] for d in (0.0, 0.5, 1.0)}
        assert max(by_depth[0.0]) < min(by_depth[0.5]) <= max(by_depth[0.5]) < min(by_depth[1.0])
        # Depth 1.0 is the last sentence boundary before the protected tail (or the filler's end, when the
        # question after the filler is longer than that tail), not somewhere early. Byte tokenizer: 1 token per byte.
        for (first, end, n), s in zip(spans, samples):
            filler_end = len(s.prompt[: s.prompt.index("\n\nWhat is the special")].encode())
            if s.meta["depth"] == 1.0:
                assert min(n - math.ceil(0.1 * n), filler_end) - end < 120


def test_needle_protection_is_checked(wiki, tiny_llama):
    _, tokenizer, cfg = tiny_llama
    base = ["eval=needle", "model=tiny-llama", f"eval.source={wiki}", "eval.lengths=[1024]", "pruning=random"]
    with pytest.raises(ConfigError, match=r"eval\.protected_recent: 0\.1 < pruning\.keep_recent=0\.2"):
        synthetic.validate(compose("eval", [*base, "pruning.keep_recent=0.2"]))
    with pytest.raises(ConfigError, match=r"eval\.protected_first: 4 < kv\.keep_first=16"):
        synthetic.validate(compose("eval", [*base, "kv=h2o", "kv.keep_first=16"]))
    synthetic.validate(compose("eval", [*base, "pruning.keep_recent=0.2", "eval.protected_recent=0.2"]))
    # A needle at the very end of the prompt (the old depth-1.0 placement) is caught before generation.
    sample = make_samples("needle", tokenizer, wiki, [1024], [0.5], 1, seed=0)[0]
    sample.prompt = sample.prompt.replace(sample.needle, "") + " " + sample.needle
    with pytest.raises(AssertionError, match="touch the protected spans"):
        synthetic.assert_needle_unprotected(compose("eval", base), tokenizer, [sample], False, None)


def test_needle_run_scores_per_depth(wiki, tmp_path):
    from sdtp.cli.evaluate import run

    metrics = run(compose("eval", ["eval=needle", "model=tiny-llama", "pruning=random", f"eval.source={wiki}",
                                   "eval.lengths=[600]", "eval.depths=[0.0,1.0]", "eval.num_samples=1",
                                   "eval.max_new_tokens=2", f"run_dir={tmp_path}"]))["results"]
    assert set(metrics["by_depth"]) == {"depth0.0", "depth1.0"}
    assert set(metrics["by_length_depth"]) == {"length600/depth0.0", "length600/depth1.0"}
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["needle_tokens"]) == 2 for r in rows)
