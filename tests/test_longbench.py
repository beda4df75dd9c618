"""LongBench v1 runner: official metrics on fixed strings, middle truncation, chat rules, CLI smoke run."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from sdtp.config import compose
from sdtp.engine.generation import generate
from sdtp.errors import ConfigError
from sdtp.eval import longbench
from sdtp.eval.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    dataset_score,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    sample_score,
)
from sdtp.eval.longbench_tasks import DATASETS, PAPER_TABLE1


def test_qa_f1_normalises_and_scores_bag_of_tokens():
    assert normalize_answer("The  Cat, a dog!") == "cat dog"
    # pred {eiffel, tower}; gold {eiffel, tower, in, paris}: P = 1, R = 1/2 -> F1 = 2/3
    assert qa_f1_score("The Eiffel Tower!", "eiffel tower in paris") == pytest.approx(2 / 3)
    assert qa_f1_score("nothing shared", "eiffel tower") == 0.0


def test_rouge_l_is_the_rouge_package_summary_level_score():
    assert rouge_score("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # `rouge` counts unique words: union-LCS {the, cat, on, mat} = 4 of 5 unique words each side -> F = 0.8
    # (rouge-score's LCS F would be 5/6: the official numbers depend on this package choice).
    assert rouge_score("the cat sat on the mat", "the cat was on the mat") == pytest.approx(0.8, abs=1e-6)
    assert rouge_score("", "reference text") == 0.0  # the package raises; LongBench scores 0


def test_retrieval_and_count_score_the_share_of_correct_numbers():
    assert retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert retrieval_score("Paragraph 3, or maybe Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("no idea", "Paragraph 3") == 0.0
    assert count_score("There are 5 unique paragraphs", "5") == 1.0
    assert count_score("5 or 6 or 7", "5") == pytest.approx(1 / 3)


def test_code_sim_takes_first_code_line_and_fuzz_ratio():
    # "x = foo(1)" vs "x = foo(2)": 9 matching chars of 20 -> ratio 0.9 -> fuzz 90 -> 0.9
    assert code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert code_sim_score("\n\nreturn a", "return a") == 1.0
    assert code_sim_score("# only comments", "return a") == 0.0


def test_classification_keeps_official_quirks():
    classes = ["Abbreviation", "Entity", "Human"]
    assert classification_score("Abbreviation and Entity", "Entity", all_classes=classes) == 0.5
    assert classification_score("Entity", "Entity", all_classes=classes) == 1.0
    assert classification_score("something else", "Entity", all_classes=classes) == 0.0
    # "Human" (a strict substring of the answer) is removed while iterating, so "being" is skipped
    # and survives: 1/2, where a clean implementation would give 1.0.
    quirky = ["Human being", "Human", "being"]
    assert classification_score("Human being", "Human being", all_classes=quirky) == 0.5


def test_sample_score_max_over_answers_and_first_line_rule():
    assert sample_score("qa_f1", "\nParis\nLondon is big", ["Paris"], None, first_line=True) == 1.0
    assert sample_score("qa_f1", "Paris", ["London", "paris"], None) == 1.0
    assert dataset_score([1.0, 0.5, 0.0]) == 50.0


def test_summary_avg_is_mean_over_datasets_not_categories():
    summary = longbench.summarize({"hotpotqa": 30.0, "2wikimqa": 10.0, "multi_news": 50.0})
    assert summary["categories"] == {"multi_doc_qa": 20.0, "summarization": 50.0}
    assert summary["avg"] == 30.0  # (30 + 10 + 50) / 3, not (20 + 50) / 2
    assert len(PAPER_TABLE1) == 14 and DATASETS["multi_news"].max_new_tokens == 512


@pytest.mark.parametrize(("model", "expected"), [("llama2-7b", 3500), ("llama3-8b", 7500),
                                                ("mistral-7b-instruct-v0.2", 31500)])
def test_prompt_length_follows_model2maxlen(model, expected):
    # THUDM's model2maxlen.json: llama2-7b-chat-4k 3500, *-8k 7500, *-32k 31500 (a "K" is 1000 tokens, 500 spare).
    cfg = compose("eval", ["eval=longbench", f"model={model}"])
    assert longbench.max_prompt_length(cfg) == expected
    assert expected + DATASETS["multi_news"].max_new_tokens <= cfg.model.max_length
    cfg = compose("eval", ["eval=longbench", f"model={model}", "eval.max_length=1234"])
    assert longbench.max_prompt_length(cfg) == 1234


def test_max_new_tokens_caps_but_never_raises_the_official_length():
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama", "eval.max_new_tokens=128"])
    assert longbench.max_new_tokens(cfg, "multi_news") == 128  # official 512
    assert longbench.max_new_tokens(cfg, "hotpotqa") == DATASETS["hotpotqa"].max_new_tokens == 32
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama"])
    assert longbench.max_new_tokens(cfg, "multi_news") == 512


def test_truncate_middle_keeps_head_and_tail(tiny_llama):
    _, tokenizer, _ = tiny_llama
    prompt = "HEAD instructions. " + "filler " * 200 + "TAIL question?"
    short, truncated = longbench.truncate_middle(tokenizer, prompt, max_length=len(prompt) + 10)
    assert (short, truncated) == (prompt, False)
    cut, truncated = longbench.truncate_middle(tokenizer, prompt, max_length=100)
    assert truncated and cut.startswith("HEAD instructions. ") and cut.endswith("TAIL question?")
    assert len(tokenizer(cut).input_ids) == 100 and cut[:50] == prompt[:50] and cut[-50:] == prompt[-50:]


def test_chat_template_skipped_for_few_shot_and_code(tiny_llama):
    _, tokenizer, _ = tiny_llama
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    record = {"context": "ctx", "input": "q"}
    chat_ids, _ = longbench.build_input(tokenizer, DATASETS["multi_news"], record, 1000, chat=True)
    plain_ids, _ = longbench.build_input(tokenizer, DATASETS["lcc"], record, 1000, chat=True)
    assert tokenizer.decode(chat_ids[0]).startswith("<u>You are given several news passages")
    assert tokenizer.decode(plain_ids[0]) == DATASETS["lcc"].prompt.format(**record)


def test_min_new_tokens_blocks_eos_at_first_step(tiny_llama):
    model, _, _ = tiny_llama
    ids = torch.arange(4, 40).unsqueeze(0)
    first = generate(model, ids, 1).tokens[0]
    blocked = generate(model, ids, 2, eos_token_id=first, min_new_tokens=1).tokens
    assert blocked[0] != first and generate(model, ids, 2, eos_token_id=first).tokens == [first]


def _records(path, n=2):
    rows = [{"input": "", "context": f"Passage {i}: " + "news text. " * 60, "answers": ["a summary of news"],
             "length": 120, "all_classes": None, "_id": f"id{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_missing_or_unknown_dataset_is_a_config_error(tmp_path, monkeypatch):
    real_find = importlib.util.find_spec
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama", f"eval.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.data_files.multi_news"):
        longbench.validate(cfg)
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama", "eval.datasets=[nope]"])
    with pytest.raises(ConfigError, match="eval.datasets"):
        longbench.validate(cfg)
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama", "eval.datasets=[dureader]",
                           f"eval.data_dir={tmp_path}"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jieba" else real_find(name, *a))
    with pytest.raises(ConfigError, match="pip install jieba"):  # before any data file or prediction
        longbench.validate(cfg)
    monkeypatch.undo()
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama", "model.max_length=512", f"eval.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="leaves no prompt tokens"):
        longbench.validate(cfg)


@pytest.mark.parametrize("pruning", ["none", "random"])
def test_cli_run_writes_predictions_and_resumes(tmp_path, pruning, capsys):
    from sdtp.cli.evaluate import run

    _records(tmp_path / "multi_news.jsonl")
    overrides = ["eval=longbench", "model=tiny-llama", f"pruning={pruning}", f"eval.data_dir={tmp_path}",
                 "eval.limit=2", "eval.max_length=256", "eval.max_new_tokens=3", f"run_dir={tmp_path / 'run'}"]
    metrics = run(compose("eval", overrides))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"] == metrics["results"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["multi_news/id0", "multi_news/id1"]
    assert all(r["truncated"] and r["prompt_tokens"] <= 256 and 1 <= r["new_tokens"] <= 3 for r in rows)
    results = metrics["results"]
    assert results["datasets"]["multi_news"] == dataset_score([r["score"] for r in rows])
    if pruning == "none":
        assert results["avg_kept_fraction"] == 1.0
    else:
        assert results["avg_kept_fraction"] < results["avg_layer_token_fraction"] < 1.0
    # A crash after the first sample: the rerun predicts only what is missing and scores the same.
    (tmp_path / "run" / "metrics.json").unlink()
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "run" / "predictions.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    again = run(compose("eval", overrides))
    assert again["results"]["datasets"] == results["datasets"]
    assert len((tmp_path / "run" / "predictions.jsonl").read_text().splitlines()) == 2


def test_dense_prediction_matches_hf_generate(tmp_path, tiny_llama):
    model, tokenizer, _ = tiny_llama
    _records(tmp_path / "multi_news.jsonl", n=1)
    cfg = compose("eval", ["eval=longbench", "model=tiny-llama", f"eval.data_dir={tmp_path}", "eval.max_length=200",
                           "eval.max_new_tokens=6"])
    longbench.run(cfg, model, tokenizer, None, tmp_path)
    row = json.loads((tmp_path / "predictions.jsonl").read_text())
    record = json.loads((tmp_path / "multi_news.jsonl").read_text())
    ids, _ = longbench.build_input(tokenizer, DATASETS["multi_news"], record, 200, chat=False)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert row["pred"] == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
