"""The ``longbench`` training source (sdtp/data.py): LongBench records as the continuation eval builds them."""

from __future__ import annotations

import json

import pytest
import torch

from sdtp.config import compose
from sdtp.data import build_examples, longbench_examples, validate_source
from sdtp.errors import ConfigError
from sdtp.eval.continuation import build_segments
from sdtp.eval.passage_qa import EVAL_RECORDS

CONT = 6


def _multi_news(tmp_path, n: int):
    """A LongBench-schema JSONL whose records differ in length and answer."""
    rows = [{"input": "", "context": f"Passage {i}: " + f"news item {i} about the council budget. " * (20 + i % 7),
             "answers": [f"Council {i} approved the budget."], "length": 100} for i in range(n)]
    path = tmp_path / "multi_news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data(path, first_doc: int = EVAL_RECORDS, num: int = 3, **extra) -> dict:
    source = {"name": "multi_news", "path": str(path), "hub": None, "format": "longbench", "first_doc": first_doc,
              "num_samples": num, **extra}
    return {"sources": [source], "max_length": 96, "continuation_length": CONT, "min_prompt_length": 4,
            "chat_template": True}


def test_examples_are_the_evaluation_segments_of_later_records(tmp_path, tiny_llama):
    """Prompt + gold answer exactly as ``eval.dataset=longbench`` builds the same records, at the source's own
    ``context_len`` (longer than the text windows' ``max_length``)."""
    path, tokenizer = _multi_news(tmp_path, EVAL_RECORDS + 4), tiny_llama[1]
    data = _data(path, context_len=150)
    validate_source(data["sources"][0], "data.sources.0")
    examples = longbench_examples(tokenizer, data["sources"][0], data)
    cfg = compose("eval", ["model=tiny-llama", "eval=continuation", "eval.dataset=longbench",
                           f"eval.data_file={path}", "eval.task=multi_news", "eval.context_len=150",
                           f"eval.cont_len={CONT}", f"eval.doc_start={EVAL_RECORDS}", "eval.num_segments=3",
                           "pruning=none"])
    segs, _ = build_segments(cfg.eval, tokenizer)
    assert len(examples) == 3
    for (ids, split), (ctx, cont) in zip(examples, segs):
        assert split == ctx.shape[1] and torch.equal(ids, torch.cat([ctx[0], cont[0]]))
        assert split > 96  # the source's budget, not data.max_length
    mixed = build_examples(tokenizer, data, seed=0)
    assert sorted(ids.tolist() for ids, _ in mixed) == sorted(ids.tolist() for ids, _ in examples)


def test_default_budget_fits_max_length(tmp_path, tiny_llama):
    path, tokenizer = _multi_news(tmp_path, EVAL_RECORDS + 2), tiny_llama[1]
    data = _data(path, num=2)
    data["max_length"] = 120
    for ids, split in longbench_examples(tokenizer, data["sources"][0], data):
        assert ids.shape[0] <= 120 and ids.shape[0] - split <= CONT


@pytest.mark.parametrize(("extra", "match"), [
    ({"first_doc": EVAL_RECORDS - 1}, "first_doc.*evaluation cells"),
    ({"task": "not_a_task"}, "task.*not a LongBench task"),
    ({"context_len": 4}, "context_len.*>= 16"),
    ({"path": None, "hub": "THUDM/LongBench"}, "path.*local jsonl"),
])
def test_bad_sources_are_refused_before_any_model_work(tmp_path, extra, match):
    source = _data(_multi_news(tmp_path, 2))["sources"][0] | extra
    with pytest.raises(ConfigError, match=match):
        validate_source(source, "data.sources.0")
