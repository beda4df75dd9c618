"""The offline multi-passage QA set (sdtp/eval/passage_qa.py) and its continuation segments."""

from __future__ import annotations

import json

import pytest

from sdtp.config import compose
from sdtp.errors import ConfigError
from sdtp.eval.continuation import build_segments, validate
from sdtp.eval.passage_qa import eligible_targets, passage_qa_records


def _dolly(tmp_path, rows: int = 40):
    """A Dolly-like JSONL: QA targets (closed_qa / information_extraction) and other rows with contexts."""
    records = []
    for i in range(rows):
        category = ("closed_qa", "information_extraction", "summarization", "open_qa")[i % 4]
        context = "" if category == "open_qa" else f"Reference text number {i}. " + "filler words here. " * (12 + i % 5)
        records.append({"instruction": f"What is number {i}?", "context": context, "response": f"It is {i}.",
                        "category": category})
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_records_hide_the_target_among_distractors_within_the_budget(tmp_path, tiny_llama):
    tokenizer = tiny_llama[1]
    records = passage_qa_records(_dolly(tmp_path), tokenizer, context_len=1200, start=0, num=4)
    for record in records:
        passages = record["context"].split("\n\nPassage ")
        assert record["passages"] == len(passages) > 1
        # the passage at `depth` is the target's own text (same number as its question and answer)
        number = record["input"].removeprefix("What is number ").removesuffix("?")
        assert passages[record["depth"]].split(":\n", 1)[1].startswith(f"Reference text number {number}.")
        assert record["answers"] == [f"It is {number}."]
        assert len(tokenizer(record["context"], add_special_tokens=False).input_ids) <= 1200
    depths = {r["depth"] for r in records}
    assert len(depths) > 1  # the target is not always in the same slot


def test_a_record_does_not_depend_on_how_many_are_built(tmp_path, tiny_llama):
    path, tokenizer = _dolly(tmp_path), tiny_llama[1]
    many = passage_qa_records(path, tokenizer, 1200, start=0, num=6)
    assert passage_qa_records(path, tokenizer, 1200, start=3, num=2) == many[3:5]
    assert len({r["_id"] for r in many}) == 6  # distinct targets: disjoint ranges share none


def test_targets_are_qa_rows_with_reference_text(tmp_path):
    rows = [json.loads(line) for line in _dolly(tmp_path).read_text().splitlines()]
    rows = [r for r in rows if r["context"]]
    assert {rows[i]["category"] for i in eligible_targets(rows)} == {"closed_qa", "information_extraction"}


def test_too_many_records_or_no_room_is_a_clear_error(tmp_path, tiny_llama):
    path = _dolly(tmp_path)
    with pytest.raises(ConfigError, match="eligible"):
        passage_qa_records(path, tiny_llama[1], 1200, start=0, num=1000)
    with pytest.raises(ConfigError, match="context_len"):
        passage_qa_records(path, tiny_llama[1], 100, start=0, num=1)


def test_continuation_segments_end_with_the_question_and_score_the_answer(tmp_path, tiny_llama):
    path, tokenizer = _dolly(tmp_path), tiny_llama[1]
    cfg = compose("eval", ["model=tiny-llama", "eval=continuation", "eval.dataset=passage_qa",
                           f"eval.data_file={path}", "eval.context_len=1200", "eval.num_segments=3", "pruning=none"])
    validate(cfg)
    segs, _ = build_segments(cfg.eval, tokenizer)
    records = passage_qa_records(path, tokenizer, 1200, 0, 3)
    for (ctx, cont), record in zip(segs, records):
        prompt = tokenizer.decode(ctx[0])
        assert prompt.rstrip().endswith(f"Question: {record['input']}\nAnswer:")
        assert tokenizer.decode(cont[0]) == record["answers"][0]
