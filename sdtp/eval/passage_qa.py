"""Multi-passage question answering built offline from Dolly-15k: a long-document QA set in LongBench's format.

LongBench's QA tasks (hotpotqa, 2wikimqa, ...) cannot be read offline here, yet they are the use case
where a pruner must keep one passage deep inside a long prompt because the question at the end asks
about it. This builds records of the same shape from the offline Dolly-15k file: the target is a
``closed_qa`` or ``information_extraction`` row (question over a reference text); its reference text
is placed at a random depth among other rows' reference texts (distractors) until the passages fill
the token budget; the question is the row's instruction and the gold answer its response. Records
are ``{context, input, answers}``, formatted with LongBench's ``hotpotqa`` prompt ("Passage k:"
blocks, question last) by :mod:`sdtp.eval.continuation`.

Record ``i`` is the ``i``-th target of a fixed seeded shuffle of the eligible rows, and its distractors
and passage order come from a generator seeded with ``i``: a record does not depend on how many are
built, so disjoint index ranges give disjoint validation and test sets.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from sdtp.errors import ConfigError
from sdtp.utils import read_jsonl_records

TASK = "hotpotqa"  # the LongBench template the records are formatted with (multi-passage QA, question last)
TARGET_CATEGORIES = ("closed_qa", "information_extraction")
SHUFFLE_SEED = 20260101  # fixed: changing it changes every record
TEMPLATE_TOKENS = 160  # room left for the template, question and chat wrapper within context_len
MIN_CONTEXT_CHARS = 200  # targets with shorter reference texts are too easy to keep by chance
EVAL_RECORDS = 128  # records [0, 64) are the test cells, [64, 128) validation: training reads from here on


def _reference_rows(path: Path) -> list[dict[str, Any]]:
    """Dolly rows that carry a reference text (``context``), in file order."""
    return [r for _, r in read_jsonl_records(path, "eval.data_file", None) if str(r.get("context", "")).strip()]


def eligible_targets(rows: list[dict[str, Any]]) -> list[int]:
    """Indices into ``rows`` of the QA targets, in the fixed seeded order records are drawn from."""
    targets = [i for i, r in enumerate(rows) if r.get("category") in TARGET_CATEGORIES
               and len(str(r["context"])) >= MIN_CONTEXT_CHARS and str(r.get("response", "")).strip()]
    random.Random(SHUFFLE_SEED).shuffle(targets)
    return targets


def build_record(rows: list[dict[str, Any]], target: int, index: int, budget: int, count_tokens: Any) -> dict:
    """One record: ``rows[target]``'s reference text among distractors filling ``budget`` tokens.

    ``count_tokens(text) -> int``. Distractors are drawn without replacement from the other rows by a
    generator seeded with ``index``; the target's depth is uniform over the passage slots.
    """
    rng = random.Random(index)
    passages = [str(rows[target]["context"]).strip()]
    used = count_tokens(passages[0])
    for other in rng.sample(range(len(rows)), len(rows)):
        if other == target:
            continue
        text = str(rows[other]["context"]).strip()
        cost = count_tokens(text)
        if used + cost > budget:
            if used >= budget * 0.9:
                break
            continue  # too long for the remaining room: try a shorter one
        passages.append(text)
        used += cost
    depth = rng.randrange(len(passages))
    passages.insert(depth, passages.pop(0))
    context = "\n\n".join(f"Passage {k + 1}:\n{text}" for k, text in enumerate(passages))
    return {"context": context, "input": str(rows[target]["instruction"]).strip(),
            "answers": [str(rows[target]["response"]).strip()], "_id": f"dolly-{target}", "depth": depth,
            "passages": len(passages)}


def evaluation_questions(path: str | Path) -> set[tuple[str, str]]:
    """(instruction, context) of the rows behind records ``[0, EVAL_RECORDS)``: what training must not see."""
    rows = _reference_rows(Path(path))
    return {(str(rows[t]["instruction"]).strip(), str(rows[t]["context"]).strip())
            for t in eligible_targets(rows)[:EVAL_RECORDS]}


def passage_qa_records(path: str | Path, tokenizer: Any, context_len: int, start: int, num: int) -> list[dict]:
    """Records ``[start, start + num)`` for prompts of about ``context_len`` tokens (see module docstring)."""
    rows = _reference_rows(Path(path))
    targets = eligible_targets(rows)
    if start + num > len(targets):
        raise ConfigError(f"eval.doc_start + eval.num_segments: {start + num} passage-QA records requested, but "
                          f"{path} has only {len(targets)} eligible {'/'.join(TARGET_CATEGORIES)} rows")
    budget = context_len - TEMPLATE_TOKENS
    if budget < 64:
        raise ConfigError(f"eval.context_len: {context_len} leaves no room for passages "
                          f"(need > {TEMPLATE_TOKENS + 64})")

    @functools.lru_cache(maxsize=None)
    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids) + 6  # + "Passage k:\n" and separator

    return [build_record(rows, targets[i], i, budget, count_tokens) for i in range(start, start + num)]
