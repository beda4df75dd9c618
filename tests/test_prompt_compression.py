"""LLMLingua-2 prompt compression on a tiny random token classifier: kept words are the top-scored ones,
the budget (in the evaluated model's tokens) is respected, the template around the context is kept, and
the LongBench runner records it. Offline: the classifier is built from a config and saved to a temp dir."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("llmlingua")

from sdtp.cli.evaluate import run, validate_eval  # noqa: E402
from sdtp.config import compose  # noqa: E402
from sdtp.errors import ConfigError  # noqa: E402
from sdtp.eval.prompt_compression import (LLMLingua2, PromptCompression, TokenCounter, compressed_ids,  # noqa: E402
                                          split_context, unavailable)

WORDS = ("the river city report budget news summary data model token market vote court school storm road "
         "farm music health energy water trade bank price union study").split()
PIECES = ("walk", "##ing", "##ed")  # word pieces, merged into one word by llmlingua (mean of their scores)


def _text(seed: int, n: int = 150) -> str:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) if rng.random() > 0.1 else "walking" for _ in range(n)]
    for i in range(12, n, 25):
        words[i] += " ?"
    return " ".join(words)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A 1-layer BERT token classifier with random weights; llmlingua needs the architecture in the name."""
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("lingua") / "tiny-bert-base-multilingual-cased"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "!", ",", ":", "Paragraph", *"0123456789", *WORDS,
             *PIECES]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=False).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, max_position_embeddings=512,
                        architectures=["BertForTokenClassification"])
    BertForTokenClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lingua(classifier_dir, tiny_llama, single_thread):
    """Budgets counted by the tiny models' byte tokenizer: a space costs a token, so the first pass overshoots."""
    return LLMLingua2(str(classifier_dir), tiny_llama[1], force_tokens=[])


def _word_scores(classifier_dir, text: str) -> list[float]:
    """Per word, the classifier's mean P(keep) over its pieces, computed here without llmlingua."""
    from transformers import BertForTokenClassification, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(classifier_dir)
    model = BertForTokenClassification.from_pretrained(classifier_dir).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids  # [CLS] ... [SEP], as llmlingua feeds a chunk
    with torch.no_grad():
        probs = model(input_ids=ids).logits.softmax(-1)[0, 1:-1, 1].tolist()
    words: list[list[float]] = []
    for piece, p in zip(tokenizer.convert_ids_to_tokens(ids[0, 1:-1]), probs):
        if piece.startswith("##"):
            words[-1].append(p)
        else:
            words.append([p])
    return [sum(w) / len(w) for w in words]


def test_kept_words_are_the_top_scored_and_the_budget_holds(lingua, classifier_dir, tiny_llama):
    text = _text(0)
    total = lingua.tokens(text)
    target = int(0.4 * total)
    result = lingua.compress(text, target, word_labels=True)
    labelled = [item.rsplit(" ", 1) for item in result["fn_labeled_original_prompt"].split("\t\t|\t\t")]
    words, kept = [w for w, _ in labelled], [label == "1" for _, label in labelled]
    assert words == text.split()  # every word scored once, in order ("walking": walk + ##ing merged)
    # The compressed text is the kept words in their order (joined as the classifier's tokenizer joins
    # tokens: "music ?" -> "music?"), and fits the budget in the evaluated model's tokens.
    join = lingua.compressor.tokenizer.convert_tokens_to_string
    assert result["compressed_prompt"] == join([w for w, k in zip(words, kept) if k])
    assert result["tokens"] == len(tiny_llama[1](result["compressed_prompt"], add_special_tokens=False).input_ids)
    assert 0.5 * target <= result["tokens"] <= target
    # Top-scored: every kept word outscores every dropped one (scores recomputed without llmlingua).
    scores = _word_scores(classifier_dir, text)
    assert len(scores) == len(words)
    kept_scores = [s for s, k in zip(scores, kept) if k]
    dropped = [s for s, k in zip(scores, kept) if not k]
    assert kept_scores and dropped and min(kept_scores) > max(dropped) - 1e-5


def test_an_overshoot_is_compressed_again_with_a_smaller_target(tiny_llama):
    """llmlingua's percentile threshold can overshoot the budget by a few tokens: ask again, smaller."""

    class Overshooting:  # the library's call, answering 5 tokens over whatever it is asked for
        asked: list[int] = []

        def compress_prompt_llmlingua2(self, context, target_token, **kwargs):
            self.asked.append(target_token)
            return {"compressed_prompt": "x" * (target_token + 5)}

    lingua = LLMLingua2.__new__(LLMLingua2)
    lingua.compressor, lingua.counter = Overshooting(), TokenCounter(tiny_llama[1])  # byte tokens: "x" = 1
    lingua.force_tokens, lingua.drop_consecutive = [], True
    result = lingua.compress("some context", 100)
    assert lingua.compressor.asked == [100, 95] and result["tokens"] == 100 and result["calls"] == 2


def test_force_tokens_are_always_kept(classifier_dir, tiny_llama, single_thread):
    forced = LLMLingua2(str(classifier_dir), tiny_llama[1], force_tokens=["?"])
    text = _text(1)
    result = forced.compress(text, int(0.3 * forced.tokens(text)))
    assert result["compressed_prompt"].count("?") == text.count("?") > 0


def test_compressed_prompt_keeps_the_template_and_meets_the_prompt_budget(lingua, tiny_llama):
    tokenizer = tiny_llama[1]
    context = _text(2)
    head, tail = "Summarize the news.\n\n", "\n\nNow, write a summary.\n\nSummary:"
    prompt = head + context + tail

    def encode(text):
        return torch.tensor([tokenizer(text).input_ids])

    ids, record = compressed_ids(PromptCompression(lingua, 0.5), prompt, context, encode)
    n = encode(prompt).shape[1]
    assert record["original_prompt_tokens"] == n and ids.shape[1] <= round(0.5 * n)
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert text.startswith(head) and text.endswith(tail)
    assert record["context_tokens"] > record["compressed_context_tokens"] > 0 and record["compress_s"] >= 0
    tight, squeezed = compressed_ids(PromptCompression(lingua, 0.05), prompt, context, encode)  # template > budget
    assert tokenizer.decode(tight[0], skip_special_tokens=True) == head + tail and squeezed["compress_calls"] == 0
    plain, none = compressed_ids(None, prompt, context, encode)
    assert none == {} and torch.equal(plain, encode(prompt))
    assert split_context(prompt, "not there") == ("", prompt, "")  # a truncation cut the template: all is context


def test_longbench_run_records_compression(classifier_dir, tmp_path, single_thread):
    rows = [{"input": "", "context": _text(10 + i), "answers": ["the river report"], "length": 150,
             "all_classes": None, "_id": f"id{i}"} for i in range(2)]
    (tmp_path / "multi_news.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(compose("eval", [
        "eval=longbench", "model=tiny-llama", "+compression=llmlingua2", f"compression.model={classifier_dir}",
        "compression.rate=0.5", f"eval.data_dir={tmp_path}", "eval.limit=2", "eval.max_new_tokens=2",
        f"run_dir={tmp_path / 'run'}"]))
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2
    for p in preds:
        assert p["prompt_tokens"] <= round(0.5 * p["original_prompt_tokens"]) and p["compress_s"] >= 0
    results = metrics["results"]
    assert results["compression_ratio"] >= 2.0 and results["avg_layer_token_fraction"] == 1.0
    assert metrics["fingerprint"]["packages"]["llmlingua"] == "0.2.2"
    assert metrics["fingerprint"]["config"]["compression"]["rate"] == 0.5


def test_synthetic_run_compresses_the_paragraphs_only(classifier_dir, tmp_path, single_thread):
    rng = random.Random(0)
    lines = []
    for article in range(6):  # WikiText layout, words the classifier knows
        lines += [" ", f" = Article {article} = ", " "]
        lines += [" " + " . ".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(4)) + " . "
                  for _ in range(4)]
    (tmp_path / "wiki.raw").write_text("\n".join(lines) + "\n")
    metrics = run(compose("eval", [
        "eval=passage_count", "model=tiny-llama", "+compression=llmlingua2", f"compression.model={classifier_dir}",
        "compression.rate=0.6", f"eval.source={tmp_path / 'wiki.raw'}", "eval.lengths=[1500]", "eval.num_samples=2",
        "eval.max_new_tokens=2", f"run_dir={tmp_path / 'run'}"]))
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and metrics["results"]["compression_ratio"] >= 1 / 0.6
    for p in preds:
        assert p["prompt_tokens"] <= round(0.6 * p["original_prompt_tokens"])
        assert p["context_tokens"] > p["compressed_context_tokens"] > 0  # the instruction around them is kept


def test_bad_compression_settings_fail_before_the_model_loads(tmp_path):
    base = ["eval=longbench", "model=tiny-llama", "+compression=llmlingua2"]
    with pytest.raises(ConfigError, match="compression.rate"):
        validate_eval(compose("eval", base + ["compression.rate=1.5"]))
    with pytest.raises(ConfigError, match="compression.model"):
        validate_eval(compose("eval", base + ["compression.model=/models/some-compressor"]))
    with pytest.raises(ConfigError, match="does not compress prompts"):
        validate_eval(compose("eval", ["eval=lm_eval", "model=tiny-llama", "+compression=llmlingua2"]))
    # The real compressor is not on this machine (offline): the reason, not an exception.
    assert unavailable(str(tmp_path / "xlm-roberta-large-missing"))
