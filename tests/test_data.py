"""Training data sources: raw text files split into documents, instruction prompts tokenised as evaluation
tokenises them."""

from __future__ import annotations

import copy

from tokenizers import processors

from sdtp.data import _local_records, instruction_examples
from sdtp.models.tiny import byte_tokenizer

DATA = {"continuation_length": 8, "max_length": 200, "min_prompt_length": 4}
RECORDS = [{"instruction": "Name a colour.", "context": "Colours are nice.", "response": "Blue."}]


def test_raw_wikitext_blank_lines_with_spaces_separate_documents(tmp_path):
    """WikiText-2's raw files separate paragraphs with " \\n" lines, not empty ones."""
    path = tmp_path / "wiki.valid.raw"
    path.write_text(" \n = Title = \n \n First paragraph . \n \n Second paragraph . \n")
    assert [r["text"] for r in _local_records(path, "data.sources.0", None)] == [
        "= Title =", "First paragraph .", "Second paragraph ."]


def test_plain_instruction_prompts_start_with_the_tokenizers_bos():
    """A base model (no chat template) reads each prompt after BOS, as the evaluation encodes it."""
    tokenizer = byte_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    (ids, split), = instruction_examples(tokenizer, RECORDS, {**DATA, "chat_template": True}, 1, seed=0)
    text = "Name a colour.\n\nColours are nice.\n\n"
    assert ids[:split].tolist() == tokenizer(text).input_ids and ids[0] == tokenizer.bos_token_id
    assert ids[split:].tolist() == tokenizer("Blue.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    chat = copy.deepcopy(tokenizer)  # a chat template writes its own special tokens: nothing added
    chat.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    (ids, split), = instruction_examples(chat, RECORDS, {**DATA, "chat_template": True}, 1, seed=0)
    assert ids[0] != tokenizer.bos_token_id and chat.decode(ids[:split]).startswith("<u>Name a colour.")
