"""Synthetic long-context task data built from WikiText, deterministic given a seed, at any length.

* ``needle``: one fact ("The special magic number for <key> is <7 digits>.") inserted at a sentence
  boundary of consecutive WikiText paragraphs; the model is asked for the number. Scored like
  LongBench's retrieval/count: the share of numbers in the answer that equal the gold number (so
  extra numbers cost). Depth 0 / 1 = the first / last position of the filler that lies OUTSIDE the
  spans every pruner keeps unconditionally (``protected``: the first ``keep_first`` tokens and the
  last ``keep_recent`` fraction of the prompt). Placing it at the literal end of the filler would put
  it inside the protected recent window, where every pruner keeps it for free.
* ``passage_retrieval``: "Paragraph i: ..." blocks from distinct articles and one sentence quoted
  from one of them; the model names the paragraph (LongBench's passage_retrieval_en prompt, with
  a verbatim sentence instead of an LLM-written abstract, which cannot be made offline). Scored
  with LongBench's ``retrieval_score``.
* ``passage_count``: paragraphs, some repeated, shuffled; the model counts the unique ones
  (LongBench's passage_count prompt and ``count_score``).

``length`` is the target prompt length in tokens of the evaluated model's tokenizer, template
included; filler is cut at a token boundary so prompts land within a few tokens of it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
import bisect
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sdtp.eval.longbench_metrics import count_score, retrieval_score
from sdtp.eval.longbench_tasks import DATASETS

NEEDLE_PROMPT = (
    "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
    "the number afterwards.\n\n{context}\n\nWhat is the special magic number for {input} mentioned in the provided text?"
)
NEEDLE_ANSWER_PREFIX = " The special magic number for {input} mentioned in the provided text is"
RETRIEVAL_PROMPT = (
    "Here are {n} paragraphs from Wikipedia, along with a sentence taken from one of them. Please determine which "
    "paragraph the sentence is from.\n\n{context}\n\nThe following is the sentence.\n\n{input}\n\nPlease enter the "
    "number of the paragraph that the sentence is from. The answer format must be like \"Paragraph 1\", "
    "\"Paragraph 2\", etc.\n\nThe answer is: "
)
NEEDLE_KEYS = ("amber-falcon", "quiet-harbor", "silver-orchard", "brave-comet", "golden-meadow", "hidden-lantern",
               "crimson-river", "frozen-summit", "velvet-canyon", "electric-willow", "marble-island", "copper-garden")
_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
          (" : ", ": "), (" 's ", "'s "), ("( ", "("), (" )", ")")]


@dataclass
class Sample:
    id: str
    task: str
    length: int  # target prompt tokens
    prompt: str
    answer: str  # gold, in the form the scorer expects
    answer_prefix: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    needle: str = ""  # the inserted fact (needle task), to locate it in the encoded prompt
    context: str = ""  # the text standing for the template's {context} (what prompt compression may shorten)


@dataclass(frozen=True)
class Paragraph:
    text: str
    article: int


def detokenize(text: str) -> str:
    """Undo WikiText's tokenisation artefacts (" @-@ ", " , " ...) so the filler reads as prose."""
    for old, new in _DETOK:
        text = text.replace(old, new)
    return text.strip()


@lru_cache(maxsize=4)
def wiki_paragraphs(path: str, min_words: int = 40) -> tuple[Paragraph, ...]:
    """Body paragraphs (headings dropped) of a WikiText raw file, tagged with their article index."""
    paragraphs, article = [], -1
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if re.match(r"^ = [^=].* = $", line):
            article += 1
        elif line.strip() and not line.startswith(" = ") and len(line.split()) >= min_words:
            paragraphs.append(Paragraph(detokenize(line), max(article, 0)))
    return tuple(paragraphs)


class Filler:
    """Token-budgeted text from paragraphs, with cached token counts for one tokenizer."""

    def __init__(self, tokenizer: Any, paragraphs: tuple[Paragraph, ...]) -> None:
        self.tokenizer, self.paragraphs = tokenizer, paragraphs
        self._counts: dict[int, int] = {}
        self.num_articles = len({p.article for p in paragraphs})

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def count(self, index: int) -> int:
        if index not in self._counts:
            self._counts[index] = self.tokens(self.paragraphs[index].text)
        return self._counts[index]

    def cut(self, text: str, budget: int) -> str:
        """``text`` shortened to at most ``budget`` tokens."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= budget else self.tokenizer.decode(ids[:max(budget, 0)], skip_special_tokens=True)


def _budget(filler: Filler, template: str, length: int, **fields: str) -> int:
    """Tokens left for the context once the template and other fields are in."""
    return length - filler.tokens(template.format(context="", **fields))


# Tokens of slack when keeping the needle away from the protected spans: the prompt lands within a
# few tokens of its target length, and token boundaries can merge across the needle's edges.
NEEDLE_MARGIN = 8


@dataclass(frozen=True)
class Protected:
    """Spans every pruner keeps unconditionally: the first ``first`` tokens, the last ``recent`` fraction."""

    first: int = 4
    recent: float = 0.1

    def num_recent(self, length: int) -> int:
        return min(length, math.ceil(self.recent * length - 1e-9))


def sentence_starts(text: str) -> list[int]:
    """Character offsets where a sentence or line of ``text`` starts (0 included)."""
    return [0] + [m.end() for m in re.finditer(r"(?<=[.!?])[ \t]+|\n", text) if m.end() < len(text)]


def token_positions(filler: Filler, text: str, offsets: list[int]) -> list[int]:
    """Tokens of ``text`` before each character offset (one tokenisation when the tokenizer is fast)."""
    try:
        spans = filler.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizers have no offsets: count prefixes
        return [filler.tokens(text[:c]) for c in offsets]
    starts = [start for start, _ in spans]
    return [bisect.bisect_left(starts, c) for c in offsets]


def needle_sample(filler: Filler, rng: random.Random, length: int, depth: float, template_extra: int = 0,
                  protected: Protected = Protected()) -> Sample:
    key, number = rng.choice(NEEDLE_KEYS), str(rng.randrange(1_000_000, 10_000_000))
    needle = f"The special magic number for {key} is {number}."
    prefix = NEEDLE_ANSWER_PREFIX.format(input=key)
    budget = _budget(filler, NEEDLE_PROMPT, length, input=key) - filler.tokens(needle) - filler.tokens(prefix)
    budget -= template_extra
    start, units, used = rng.randrange(len(filler.paragraphs)), [], 0
    while used < budget:
        index = (start + len(units)) % len(filler.paragraphs)
        text = filler.cut(filler.paragraphs[index].text, budget - used)
        units.append(text)
        used += filler.count(index) if text == filler.paragraphs[index].text else filler.tokens(text)
    context = "\n".join(units)
    # Allowed needle starts, in filler tokens. Template tokens are left out of head and tail on purpose:
    # fewer tokens around the filler only push the needle further from the protected ends.
    before, after = NEEDLE_PROMPT.split("{context}")
    head, tail = filler.tokens(before), filler.tokens(after.format(input=key)) + filler.tokens(prefix)
    recent = protected.num_recent(length + NEEDLE_MARGIN)
    candidates = sentence_starts(context)
    positions = token_positions(filler, context, candidates)
    lo = max(0, protected.first + NEEDLE_MARGIN - head)
    hi = filler.tokens(context) - max(0, recent + NEEDLE_MARGIN - tail)
    allowed = [(p, c) for p, c in zip(positions, candidates) if lo <= p <= hi]
    if not allowed:
        raise ValueError(f"a {length}-token needle prompt leaves no sentence boundary outside the protected spans "
                         f"(first {protected.first} tokens, last {protected.recent:.0%}); use longer eval.lengths")
    target = lo + depth * (hi - lo)
    position, cut = min(allowed, key=lambda pc: (abs(pc[0] - target), pc[0]))
    body = context[:cut] + needle + (" " + context[cut:] if cut < len(context) else "")
    return Sample(
        id="", task="needle", length=length, prompt=NEEDLE_PROMPT.format(context=body, input=key),
        answer=number, answer_prefix=prefix, needle=needle, context=body,
        meta={"depth": depth, "actual_depth": round((position - lo) / max(hi - lo, 1), 4), "key": key},
    )


def _labelled(blocks: list[str]) -> str:
    return "\n\n".join(f"Paragraph {i + 1}: {text}" for i, text in enumerate(blocks))


def _pick_paragraphs(filler: Filler, rng: random.Random, budget: int, per_block: int,
                     skip_article: int | None = None) -> list[int]:
    """Paragraph indices from distinct articles (repeating articles only once all are used) up to ``budget``."""
    order = list(range(len(filler.paragraphs)))
    rng.shuffle(order)
    chosen, used, articles = [], 0, set()
    for index in order:
        article = filler.paragraphs[index].article
        if article == skip_article or (article in articles and len(articles) < filler.num_articles - 1):
            continue
        if used + filler.count(index) + per_block > budget and chosen:
            break
        chosen.append(index)
        articles.add(article)
        used += filler.count(index) + per_block
    return chosen


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 8]


def passage_retrieval_sample(filler: Filler, rng: random.Random, length: int, template_extra: int = 0) -> Sample:
    overhead = _budget(filler, RETRIEVAL_PROMPT, length, n="30", input="") - template_extra
    candidates = [i for i in range(len(filler.paragraphs)) if _sentences(filler.paragraphs[i].text)]
    target = rng.choice(candidates)
    query = rng.choice(_sentences(filler.paragraphs[target].text))
    chosen = _pick_paragraphs(filler, rng, overhead - filler.tokens(query) - filler.count(target), 6,
                              skip_article=filler.paragraphs[target].article)
    slot = rng.randrange(len(chosen) + 1)
    chosen.insert(slot, target)
    context = _labelled([filler.paragraphs[i].text for i in chosen])
    return Sample(id="", task="passage_retrieval", length=length,
                  prompt=RETRIEVAL_PROMPT.format(n=len(chosen), context=context, input=query),
                  answer=f"Paragraph {slot + 1}", meta={"num_paragraphs": len(chosen)}, context=context)


def passage_count_sample(filler: Filler, rng: random.Random, length: int, template_extra: int = 0,
                         repeat_p: float = 0.35) -> Sample:
    template = DATASETS["passage_count"].prompt
    budget = _budget(filler, template, length) - template_extra
    pool = _pick_paragraphs(filler, rng, budget, 6)
    sequence, used, fresh = [], 0, list(pool)
    while fresh:
        repeat = sequence and rng.random() < repeat_p
        index = rng.choice(sequence) if repeat else fresh.pop()
        if used + filler.count(index) + 6 > budget and sequence:
            break
        sequence.append(index)
        used += filler.count(index) + 6
    unique = len(set(sequence))
    rng.shuffle(sequence)
    context = _labelled([filler.paragraphs[i].text for i in sequence])
    return Sample(id="", task="passage_count", length=length, prompt=template.format(context=context),
                  answer=str(unique), meta={"num_paragraphs": len(sequence), "unique": unique}, context=context)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "needle": count_score,  # share of the answer's numbers equal to the gold number
    "passage_retrieval": retrieval_score,
    "passage_count": count_score,
}


def score(task: str, prediction: str, answer: str) -> float:
    return SCORERS[task](prediction, answer)


def make_samples(task: str, tokenizer: Any, source: str | Path, lengths: list[int], depths: list[float],
                 num_samples: int, seed: int, template_extra: int = 0,
                 protected: Protected = Protected()) -> list[Sample]:
    """All samples of a task: for each length (and depth, for needle) ``num_samples`` of them.

    Each sample has its own RNG seeded from (seed, task, length, depth, index), so adding lengths or
    depths never changes the other samples. ``template_extra``: tokens a chat template adds;
    ``protected``: the spans the needle must stay out of (the same for every method compared).
    """
    filler = Filler(tokenizer, wiki_paragraphs(str(source)))
    samples = []
    for length in lengths:
        for depth in (depths if task == "needle" else [None]):
            for index in range(num_samples):
                rng = random.Random(f"{seed}/{task}/{length}/{depth}/{index}")
                if task == "needle":
                    sample = needle_sample(filler, rng, length, float(depth), template_extra, protected)
                elif task == "passage_retrieval":
                    sample = passage_retrieval_sample(filler, rng, length, template_extra)
                else:
                    sample = passage_count_sample(filler, rng, length, template_extra)
                sample.id = f"{task}/len{length}" + (f"/depth{depth}" if depth is not None else "") + f"/{index}"
                samples.append(sample)
    return samples
