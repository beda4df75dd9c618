"""The offline multi-passage QA set (sdtp/eval/passage_qa.py) and its continuation segments."""

from __future__ import annotations

import json

import pytest
import torch

from sdtp.config import build_pruner, compose
from sdtp.data import CHAT_MARGIN, build_examples, passage_qa_examples, validate_source
from sdtp.errors import ConfigError
from sdtp.eval.continuation import build_segments, validate
from sdtp.eval import passage_kept
from sdtp.eval.passage_kept import answer_tokens, kept_shares, target_span
from sdtp.eval.passage_qa import EVAL_RECORDS, eligible_targets, evaluation_questions, passage_qa_records


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
        assert tokenizer.decode(cont[0]) == " " + record["answers"][0]  # after "Answer:", as the text continues


def _data(path, fmt: str, first_doc: int = EVAL_RECORDS, num: int = 4, **extra) -> dict:
    source = {"name": fmt, "path": str(path), "hub": None, "format": fmt, "first_doc": first_doc,
              "num_samples": num, **extra}
    return {"sources": [source], "max_length": 1200, "continuation_length": 16, "min_prompt_length": 4,
            "chat_template": True}


def test_training_examples_are_the_evaluation_prompts_of_later_records(tmp_path, tiny_llama):
    """A passage_qa training example is prompt + gold answer exactly as the continuation eval builds the
    same record, so the predictor trains on the prompts it is judged on (other records)."""
    path, tokenizer = _dolly(tmp_path, rows=600), tiny_llama[1]
    data = _data(path, "passage_qa", num=3)
    validate_source(data["sources"][0], "data.sources.0")
    examples = passage_qa_examples(tokenizer, data["sources"][0], data)
    cfg = compose("eval", ["model=tiny-llama", "eval=continuation", "eval.dataset=passage_qa",
                           f"eval.data_file={path}", f"eval.context_len={1200 - 16 - CHAT_MARGIN}",
                           "eval.cont_len=16", f"eval.doc_start={EVAL_RECORDS}", "eval.num_segments=3",
                           "pruning=none"])
    segs, _ = build_segments(cfg.eval, tokenizer)
    assert len(examples) == 3
    for (ids, split), (ctx, cont) in zip(examples, segs):
        assert split == ctx.shape[1] and torch.equal(ids, torch.cat([ctx[0], cont[0]]))
        assert ids.shape[0] <= 1200


def test_training_refuses_the_evaluation_records(tmp_path):
    path = _dolly(tmp_path, rows=600)
    with pytest.raises(ConfigError, match="first_doc.*evaluation"):
        validate_source(_data(path, "passage_qa", first_doc=EVAL_RECORDS - 1)["sources"][0], "data.sources.0")


def test_instruction_source_can_skip_the_rows_behind_the_evaluation_records(tmp_path, tiny_llama):
    path, tokenizer = _dolly(tmp_path, rows=600), tiny_llama[1]
    held_out = {question for question, _ in evaluation_questions(path)}
    assert len(held_out) == EVAL_RECORDS

    def questions(**extra) -> set[str]:
        data = _data(path, "instruction", first_doc=0, num=600, **extra)
        prompts = [tokenizer.decode(ids[:split]) for ids, split in build_examples(tokenizer, data, seed=0)]
        return {q for q in held_out if any(q in p for p in prompts)}

    assert questions()  # without the flag the evaluation questions are trained on
    assert not questions(exclude_passage_qa_eval=True)


def test_instruction_source_over_the_evaluation_rows_warns(tmp_path, tiny_llama, caplog):
    """Training on the rows behind the passage-QA records is allowed (the shipped recipes did) but said."""
    path, tokenizer = _dolly(tmp_path, rows=600), tiny_llama[1]
    with caplog.at_level("WARNING", logger="sdtp.data"):
        build_examples(tokenizer, _data(path, "instruction", first_doc=0, num=8), seed=0)
    assert f"{EVAL_RECORDS} of its rows are behind passage-QA evaluation records" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdtp.data"):
        build_examples(tokenizer, _data(path, "instruction", first_doc=0, num=8, exclude_passage_qa_eval=True), seed=0)
    assert "passage-QA" not in caplog.text


def test_target_span_is_exactly_the_target_passage_text(tmp_path, tiny_llama):
    path, tokenizer = _dolly(tmp_path), tiny_llama[1]
    cfg = compose("eval", ["model=tiny-llama", "eval=continuation", "eval.dataset=passage_qa",
                           f"eval.data_file={path}", "eval.context_len=1200", "eval.num_segments=3", "pruning=none"])
    segs, _ = build_segments(cfg.eval, tokenizer)
    for (ctx, _), record in zip(segs, passage_qa_records(path, tokenizer, 1200, 0, 3)):
        span = target_span(tokenizer, ctx, record)
        assert torch.equal(span, torch.arange(int(span[0]), int(span[-1]) + 1))  # contiguous
        number = record["input"].removeprefix("What is number ").removesuffix("?")
        text = tokenizer.decode(ctx[0, span]).strip()
        assert text.startswith(f"Reference text number {number}.") and text.endswith("filler words here.")


def test_kept_shares_count_the_target_tokens_that_survive(tmp_path, tiny_llama):
    """positional keeps the first 4 and the most recent tokens: the target share is the part of the span in them."""
    model, tokenizer, _ = tiny_llama
    path = _dolly(tmp_path)
    cfg = compose("eval", ["model=tiny-llama", "eval=continuation", "eval.dataset=passage_qa", f"eval.data_file={path}",
                           "eval.context_len=1200", "eval.num_segments=3", "pruning=positional"])
    segs, _ = build_segments(cfg.eval, tokenizer)
    spans = [target_span(tokenizer, ctx, r) for (ctx, _), r in zip(segs, passage_qa_records(path, tokenizer, 1200, 0, 3))]
    sets = [{"target": span, "answer": answer_tokens(ctx, cont, span)} for (ctx, cont), span in zip(segs, spans)]
    for shares, (ctx, cont), span in zip(kept_shares(model, build_pruner(cfg), segs, sets), segs, spans):
        n, prompt = ctx.shape[1], shares["prompt"]
        recent_from = n - (round(prompt * n) - 4)
        kept = (span < 4) | (span >= recent_from)
        assert 0 < prompt < 1
        assert shares["target"] == pytest.approx(float(kept.float().mean()))
        in_answer = torch.tensor([int(t) in set(cont[0].tolist()) for t in ctx[0, span]])
        expected = float(kept[in_answer].float().mean()) if in_answer.any() else float("nan")
        assert shares["answer"] == pytest.approx(expected, nan_ok=True)


def test_passage_kept_reads_a_data_file_whose_path_hydra_would_parse(tmp_path, monkeypatch):
    """--data-file goes into a Hydra override: a folder named like a sweep job's (seed=0), or with a comma or
    brackets, failed to compose (or became a sweep) unless quoted. Without it, the config's data folder is used."""
    folder = tmp_path / "seed=0,[a]"
    (folder / "train").mkdir(parents=True)
    _dolly(folder / "train").rename(folder / "train" / "databricks_dolly_15k.jsonl")
    args = ["--model", "tiny-llama", "--records", "2", "--start", "0", "--context-len", "1200",
            "--scorer", "positional=pruning=positional", "--threads", "1", "--out", str(tmp_path / "kept.json")]
    given = passage_kept.main([*args, "--data-file", str(folder / "train" / "databricks_dolly_15k.jsonl")])
    monkeypatch.setenv("SDTP_DATA_DIR", str(folder))
    default = passage_kept.main(args)
    assert len(given["scorers"]["positional"]["target_kept"]) == 2 and given == default
