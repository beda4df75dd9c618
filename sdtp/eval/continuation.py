"""The continuation protocol: prune the prompt during prefill, then score what comes next.

    sdtp-eval eval=continuation pruning=sdtp                      # WikiText-2 test, 64 x (2048 + 128) tokens
    sdtp-eval eval=continuation pruning=random eval.dataset=jsonl \\
        eval.data_file=../shared/data/train/c4_en_1k.jsonl eval.doc_start=300 eval.doc_end=1000   # held-out C4

This is the inference use case of prefill pruning. A token stream is cut into non-overlapping
segments of ``context_len + cont_len`` tokens from its start; each segment's context is prefilled
with the pruner installed (:func:`sdtp.eval.scoring.prefill_context`) and its continuation is
scored on the pruned cache, every continuation token by every layer
(:func:`sdtp.eval.scoring.score_continuation`). A segment's number is the mean NLL per
continuation token in nats; the dense model (no pruner) takes the same code path, so methods are
compared paired on identical segments. Every scored token sees a full ``context_len`` prompt, so
the whole budget of the schedule is in play (as in the sliding-window perplexity, whose windows
share context tokens; these segments do not overlap).

Long documents (``eval.dataset=longbench``): each segment is one record of a LongBench JSONL
(``eval.task`` names its prompt template, default ``multi_news``): the context is the task prompt,
middle-truncated to ``context_len`` tokens as LongBench's ``pred.py`` does and wrapped in the chat
template (``eval.chat_template``: auto = when the tokenizer has one); the continuation is the first
``cont_len`` tokens of the gold answer (after a bare prompt, with a space before it:
:func:`sdtp.eval.longbench.gold_answer_ids`). This is the "prompt (document + instruction) -> answer" use
case; contexts shorter than ``context_len`` stay shorter.

Multi-passage QA (``eval.dataset=passage_qa``, ``eval.data_file`` = the Dolly-15k JSONL): records
``[doc_start, doc_start + num_segments)`` of :mod:`sdtp.eval.passage_qa` (a Dolly question's reference
text hidden among other rows' texts up to ``context_len`` tokens, LongBench's ``hotpotqa`` prompt, chat
template as above) -> the first ``cont_len`` tokens of the gold answer.

KV-cache compression (``kv=h2o|snapkv|streaming`` or your own, :mod:`sdtp.kv`): ``sdtp-eval`` installs the
compressor around the runner, so each context's cache is cut after its (pruned or dense) prefill and
the continuation is scored on what is left; one segment per prefill (``eval.batch_size=1``), since
a budget is a fraction of each row's own prompt.

Refill (``+pruning.refill=true``, :mod:`sdtp.eval.refill`): each context is also prefilled densely and
every layer's cache gets the dense keys/values of the positions the pruned prefill kept there, so a
scorer's choice is measured without what pruning during prefill loses (a diagnostic: two prefills per
segment). Its segments record tokens per layer 1.0 (the dense prefill filled the cache) and
``cache_fraction`` = the pruned layout's share of the dense cache.

``eval.batch_size`` > 1 scores that many segments per forward (:func:`score_segments_batch`):
contexts left-padded and each row pruned by its own budget; the numbers equal batch 1 up to float
noise (``tests/test_eval_continuation.py``), so the key is not part of the fingerprint.

Streams: WikiText-2 raw test (``"\\n\\n".join(rows)``, the HF convention) or a JSONL of ``{text}``
documents restricted to ``[doc_start, doc_end)`` and joined with the tokenizer's EOS (so held-out
documents can be picked: the shipped predictor trained on C4 documents 0..299). Both are
tokenised without special tokens.

The runner writes one line per segment to ``segments.jsonl`` as it goes and resumes from it (a
torn last line is dropped); lines from another configuration (a different fingerprint) are
ignored. A resumed ``pruning=random`` run restarts its generator, so it is reproducible but not
identical to an uninterrupted one.

The results carry ``flops``: the analytic prefill FLOPs of one ``context_len``-token context under the
schedule vs dense (:func:`schedule_flops`), the cost axis of the schedule search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from sdtp.engine.pruner import PrefillRecord, TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.kept import KeptStats
from sdtp.eval.passage_qa import TASK as PASSAGE_QA_TASK
from sdtp.eval.passage_qa import passage_qa_records
from sdtp.eval.perplexity import wikitext_rows
from sdtp.eval.refill import refill_dense
from sdtp.eval.scoring import prefill_context, prefill_contexts, score_continuation, score_continuations
from sdtp.flops import prefill_fraction
from sdtp.kv.policy import kv_enabled
from sdtp.scorers.oracle import reveal_continuation
from sdtp.utils import parse_jsonl, write_text_atomic

log = logging.getLogger(__name__)
SEGMENTS_FILE = "segments.jsonl"
DATASETS = ("wikitext", "jsonl", "longbench", "passage_qa")
Segment = tuple[torch.Tensor, torch.Tensor]  # (ctx_ids (1, context_len), cont_ids (1, cont_len))


# --------------------------------------------------------------------------------------------
# token streams and segments


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False).input_ids


def wikitext_stream(path: str | Path, tokenizer: Any) -> torch.Tensor:
    """(L,) token ids of a raw WikiText file, ``"\\n\\n".join(rows)`` as HF's perplexity convention."""
    return torch.tensor(_ids(tokenizer, ["\n\n".join(wikitext_rows(path))])[0], dtype=torch.long)


def jsonl_stream(path: str | Path, tokenizer: Any, doc_start: int = 0, doc_end: int | None = None) -> torch.Tensor:
    """(L,) token ids of documents ``[doc_start, doc_end)`` of a ``{text}`` JSONL, EOS between documents.

    Documents are the file's non-blank lines, tokenised one by one (no text-level EOS string that a
    tokenizer might split differently).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("eval.dataset=jsonl: the tokenizer has no eos_token_id to join documents with")
    docs = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    end = len(docs) if doc_end is None else int(doc_end)
    if not 0 <= int(doc_start) < end <= len(docs):
        raise ConfigError(f"eval.doc_start/eval.doc_end: [{doc_start}, {doc_end}) is not a non-empty range "
                          f"inside the {len(docs)} documents of {path}")
    texts = [json.loads(line)["text"] for line in docs[int(doc_start) : end]]
    ids: list[int] = []
    for index, doc in enumerate(_ids(tokenizer, texts)):
        ids.extend(([eos] if index else []) + doc)
    return torch.tensor(ids, dtype=torch.long)


def token_stream(ev: DictConfig, tokenizer: Any) -> torch.Tensor:
    """(L,) the stream ``cfg.eval`` describes (``dataset``, ``data_file``, ``doc_start``, ``doc_end``)."""
    if ev.dataset == "wikitext":
        return wikitext_stream(ev.data_file, tokenizer)
    return jsonl_stream(ev.data_file, tokenizer, int(ev.doc_start), ev.doc_end)


def segments(stream: torch.Tensor, context_len: int, cont_len: int, num_segments: int) -> list[Segment]:
    """The first ``num_segments`` non-overlapping (context, continuation) pairs of ``stream`` (L,).

    Segment i spans ``stream[i * (context_len + cont_len) : (i + 1) * (context_len + cont_len)]``;
    each part is returned as (1, len) for the model.
    """
    span = context_len + cont_len
    available = stream.shape[0] // span
    if num_segments > available:
        raise ConfigError(f"eval.num_segments: {num_segments} segments of eval.context_len + eval.cont_len = "
                          f"{span} tokens requested, but the stream of {stream.shape[0]} tokens has only {available}")
    out = []
    for index in range(num_segments):
        chunk = stream[index * span : (index + 1) * span].unsqueeze(0)  # (1, span)
        out.append((chunk[:, :context_len], chunk[:, context_len:]))
    return out


def longbench_segments(path: str | Path, task: str, tokenizer: Any, context_len: int, cont_len: int,
                       num_segments: int, chat: bool, start: int = 0) -> list[Segment]:
    """Records ``[start, start + num_segments)`` of a LongBench JSONL as (prompt, gold answer) segments."""
    from sdtp.eval.longbench import load_records  # longbench imports the scoring stack
    from sdtp.eval.longbench_tasks import DATASETS as TASKS

    records = load_records(Path(path), start + num_segments, TASKS[task])[start:]
    if len(records) < num_segments:
        raise ConfigError(f"eval.num_segments: {num_segments} records from eval.doc_start={start} requested, but "
                          f"{path} has only {start + len(records)} records")
    return record_segments(records, task, tokenizer, context_len, cont_len, chat)


def record_segments(records: Sequence[dict[str, Any]], task: str, tokenizer: Any, context_len: int, cont_len: int,
                    chat: bool) -> list[Segment]:
    """LongBench-format records -> (1, <= context_len + chat template) prompt ids and (1, <= cont_len)
    gold-answer ids each, the prompt built with ``task``'s template and middle-truncated as LongBench does."""
    from sdtp.eval.longbench import build_input, gold_answer_ids
    from sdtp.eval.longbench_tasks import DATASETS as TASKS

    out = []
    for record in records:
        ctx_ids, _ = build_input(tokenizer, TASKS[task], record, context_len, chat)
        answer = gold_answer_ids(tokenizer, TASKS[task], record, context_len, chat)[:cont_len]
        if not answer:
            raise ConfigError(f"eval.data_file: record {record.get('_id', '?')} has an empty gold answer")
        out.append((ctx_ids, torch.tensor([answer], dtype=torch.long)))
    return out


def passage_qa_cell(data_file: str, tokenizer: Any, context_len: int, cont_len: int, start: int, num: int,
                    chat: bool) -> tuple[list[dict[str, Any]], list[Segment]]:
    """Passage-QA records ``[start, start + num)`` and their segments (prompt -> gold answer), built once
    for the evaluation cells, the training source and the passage-kept diagnostic alike."""
    records = passage_qa_records(data_file, tokenizer, context_len, start, num)
    return records, record_segments(records, PASSAGE_QA_TASK, tokenizer, context_len, cont_len, chat)


def build_segments(ev: DictConfig, tokenizer: Any) -> tuple[list[Segment], int]:
    """The segments ``cfg.eval`` describes and the number of source tokens they were cut from."""
    context_len, cont_len, num = int(ev.context_len), int(ev.cont_len), int(ev.num_segments)
    if ev.dataset in ("longbench", "passage_qa"):
        from sdtp.eval.predict import wants_chat_template

        chat = wants_chat_template(tokenizer, ev.chat_template)
        if ev.dataset == "longbench":
            segs = longbench_segments(ev.data_file, ev.task, tokenizer, context_len, cont_len, num, chat,
                                      int(ev.doc_start))
        else:
            _, segs = passage_qa_cell(ev.data_file, tokenizer, context_len, cont_len, int(ev.doc_start), num, chat)
        return segs, sum(c.shape[1] + t.shape[1] for c, t in segs)
    stream = token_stream(ev, tokenizer)
    return segments(stream, context_len, cont_len, num), int(stream.shape[0])


def segments_sha256(segs: Sequence[Segment]) -> str:
    """Hash of every segment's token ids (tokenizer, data, lengths and count all change it)."""
    digest = hashlib.sha256()
    for ctx_ids, cont_ids in segs:
        digest.update(torch.cat([ctx_ids, cont_ids], dim=1).to(torch.int64).numpy().tobytes())
        digest.update(b"|")  # segment boundary, so (ctx, cont) splits of the same tokens differ
        digest.update(str(ctx_ids.shape[1]).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# scoring


@dataclass
class SegmentScore:
    """One segment's result: mean NLL per continuation token (nats) and how much of the context survived.

    ``kept_fraction``: context tokens after the last stage / context tokens; ``layer_fraction``:
    context tokens processed per decoder layer / context tokens, averaged over layers (both 1.0 dense);
    ``cache_fraction``: cached context entries / the dense cache's, set only when it differs from
    ``layer_fraction`` (a refilled segment: dense prefill, pruned cache layout).
    """

    nll: float
    kept_fraction: float = 1.0
    layer_fraction: float = 1.0
    cache_fraction: float | None = None


def score_segment(model: nn.Module, ctx_ids: torch.Tensor, cont_ids: torch.Tensor,
                  pruner: TokenPruner | None, refill: bool = False) -> SegmentScore:
    """Prefill ``ctx_ids`` (1, N) (pruned), then score ``cont_ids`` (1, T) on the cache.

    ``refill``: fill the pruned cache layout with a dense prefill's keys/values (:mod:`sdtp.eval.refill`).
    """
    reveal_continuation(pruner.scorer if pruner is not None else None, cont_ids)
    ctx = prefill_context(model, ctx_ids.to(model.device), pruner)
    if refill:
        ctx = refill_dense(model, ctx_ids.to(model.device), ctx)
    logprobs, _ = score_continuation(model, ctx, cont_ids.to(model.device), pruner)  # (T,)
    score = _segment_score(logprobs, ctx.record)
    return replace(score, layer_fraction=1.0, cache_fraction=score.layer_fraction) if refill else score


def _segment_score(logprobs: torch.Tensor, record: PrefillRecord | None) -> SegmentScore:
    """Mean NLL of one segment's continuation log-probs (T,) and its kept fractions (1.0 dense)."""
    kept = KeptStats()
    kept.add(record)  # no-op when dense
    nll = -float(logprobs.float().mean())
    return SegmentScore(nll, kept.final[0], kept.per_layer[0]) if kept.final else SegmentScore(nll)


@torch.inference_mode()
def score_segments_batch(model: nn.Module, segs: Sequence[Segment], pruner: TokenPruner | None) -> list[SegmentScore]:
    """:func:`score_segment` for several segments in one batch: same numbers up to float noise.

    Contexts are left-padded and prefilled together, each row pruned by its own budget
    (:func:`sdtp.eval.scoring.prefill_contexts`); the continuations are then fed in one forward on
    the pruned cache, every row continuing from its own context length
    (:func:`sdtp.eval.scoring.score_continuations`).
    """
    prefilled = prefill_contexts(model, [ctx_ids.to(model.device) for ctx_ids, _ in segs], pruner)
    scored = score_continuations(model, prefilled, [cont_ids.to(model.device) for _, cont_ids in segs], pruner)
    record = prefilled.record
    return [_segment_score(logprobs, record.row(index) if record is not None else None)
            for index, (logprobs, _) in enumerate(scored)]


def segment_nll(
    model: nn.Module,
    segs: Sequence[Segment],
    pruner: TokenPruner | None,
    on_segment: Callable[[int, SegmentScore], None] | None = None,
    desc: str = "continuation segments",
    batch_size: int = 1,
    refill: bool = False,
) -> list[SegmentScore]:
    """Score every segment in order (tqdm bar); ``on_segment(i, score)`` runs after each (checkpointing).

    ``batch_size`` > 1 scores that many segments per forward (:func:`score_segments_batch`); 1 keeps
    the one-at-a-time path (:func:`score_segment`), the only one that can ``refill``.
    """
    if refill and (pruner is None or batch_size != 1):
        raise ConfigError("pruning.refill: needs a pruner and eval.batch_size=1")
    scores: list[SegmentScore] = []
    with tqdm(total=len(segs), desc=desc) as bar:
        for start in range(0, len(segs), batch_size):
            chunk = segs[start : start + batch_size]
            if batch_size == 1:
                done = [score_segment(model, chunk[0][0], chunk[0][1], pruner, refill)]
            else:
                done = score_segments_batch(model, chunk, pruner)
            for score in done:
                scores.append(score)
                if on_segment is not None:
                    on_segment(len(scores) - 1, score)
            bar.update(len(done))
    return scores


def summarize(scores: Sequence[SegmentScore]) -> dict[str, float]:
    """Mean over segments of the per-token NLL (a segment counts once, whatever its length), its exp,
    mean kept fractions."""
    nll = math.fsum(s.nll for s in scores) / len(scores)
    caches = [s.cache_fraction for s in scores if s.cache_fraction is not None]
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        "segments": len(scores),
        "avg_kept_fraction": math.fsum(s.kept_fraction for s in scores) / len(scores),
        "avg_layer_token_fraction": math.fsum(s.layer_fraction for s in scores) / len(scores),
        **({"avg_cache_fraction": math.fsum(caches) / len(caches)} if caches else {}),
    }


# --------------------------------------------------------------------------------------------
# sdtp-eval runner


def validate(cfg: DictConfig) -> None:
    ev = cfg.eval
    if ev.dataset not in DATASETS:
        raise ConfigError(f"eval.dataset: {ev.dataset!r} not in {DATASETS}")
    if not (ev.data_file and Path(ev.data_file).is_file()):
        raise ConfigError(f"eval.data_file: {ev.data_file} not found (set SDTP_DATA_DIR to the offline data mirror)")
    for key in ("context_len", "cont_len", "num_segments", "batch_size"):
        if int(ev.get(key, 1)) < 1:
            raise ConfigError(f"eval.{key}: must be >= 1, got {ev[key]}")
    if int(ev.context_len) + int(ev.cont_len) > int(cfg.model.max_length):
        raise ConfigError(f"eval.context_len + eval.cont_len: {int(ev.context_len) + int(ev.cont_len)} exceeds "
                          f"model.max_length={cfg.model.max_length}")
    empty = ev.doc_end is not None and int(ev.doc_end) <= int(ev.doc_start)
    if ev.dataset == "longbench":
        from sdtp.eval.longbench_tasks import DATASETS as TASKS

        if ev.get("task") not in TASKS:
            raise ConfigError(f"eval.task: {ev.get('task')!r} is not a LongBench dataset ({sorted(TASKS)})")
    if int(ev.doc_start) < 0 or (ev.dataset == "jsonl" and empty):
        raise ConfigError(f"eval.doc_start/eval.doc_end: [{ev.doc_start}, {ev.doc_end}) is not a non-empty range")
    scorer = cfg.pruning.get("scorer") or {}
    # What scores one segment per prefill: the oracles that label each segment alone, and KV budgets.
    one_at_a_time = [f"pruning.scorer.{key}={scorer[key]}: that oracle labels one segment at a time"
                     for key in ("gold", "samples") if scorer.get(key)]
    if kv_enabled(cfg):
        one_at_a_time.append(f"kv={cfg.kv.method}: KV budgets are fractions of each prompt, and a batch pads them")
    if refill_enabled(cfg):
        if cfg.pruning.get("scorer") is None or kv_enabled(cfg):
            raise ConfigError("pruning.refill: refills a pruned prefill's cache; it needs a pruning method other than "
                              "none and no kv policy (the compressor would also cut the dense prefill)")
        one_at_a_time.append("pruning.refill=true: refills one unpadded prefill at a time")
    if one_at_a_time and int(ev.get("batch_size", 1)) != 1:
        raise ConfigError(f"{one_at_a_time[0]}; set eval.batch_size=1")


def refill_enabled(cfg: DictConfig) -> bool:
    """Whether ``+pruning.refill=true`` asks for the dense refill of the pruned cache (:mod:`sdtp.eval.refill`)."""
    return bool(cfg.pruning.get("refill", False))


def fingerprint(cfg: DictConfig, segs_sha: str) -> str:
    """Short hash of what one segment's number depends on: segments, model, pruning and KV config."""
    what = {"segments": segs_sha, "model": OmegaConf.to_container(cfg.model, resolve=True),
            "pruning": OmegaConf.to_container(cfg.pruning, resolve=True)}
    if kv_enabled(cfg):  # absent with kv=none, so runs from before KV support stay valid
        what["kv"] = OmegaConf.to_container(cfg.kv, resolve=True)
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rewrite(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomically replace ``path`` with ``records`` (drops a torn last line before we append to it)."""
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def load_done(path: Path, fp: str, num_segments: int) -> dict[int, SegmentScore]:
    """Segments already scored in ``path`` under fingerprint ``fp``; rewrites the file to just those."""
    records = parse_jsonl(path.read_text()) if path.is_file() else []
    done = {r["id"]: r for r in records
            if r.get("fp") == fp and isinstance(r.get("id"), int) and 0 <= r["id"] < num_segments}
    _rewrite(path, [done[i] for i in sorted(done)])
    return {i: SegmentScore(r["nll"], r["kept_fraction"], r["layer_fraction"], r.get("cache_fraction"))
            for i, r in done.items()}


def run(cfg: DictConfig, model: nn.Module, tokenizer: Any, pruner: TokenPruner | None, run_dir: Path) -> dict:
    ev = cfg.eval
    segs, source_tokens = build_segments(ev, tokenizer)
    segs_sha = segments_sha256(segs)
    fp = fingerprint(cfg, segs_sha)
    path = Path(run_dir) / SEGMENTS_FILE
    done = {} if cfg.get("force", False) else load_done(path, fp, len(segs))
    if cfg.get("force", False):
        _rewrite(path, [])
    if done:
        log.info("resuming continuation eval: %d of %d segments already in %s", len(done), len(segs), path)
    todo = [i for i in range(len(segs)) if i not in done]

    with path.open("a") as handle:

        def save(k: int, score: SegmentScore) -> None:
            done[todo[k]] = score
            fields = {key: value for key, value in asdict(score).items() if value is not None}
            handle.write(json.dumps({"id": todo[k], **fields, "fp": fp}) + "\n")
            handle.flush()

        segment_nll(model, [segs[i] for i in todo], pruner, on_segment=save, batch_size=int(ev.get("batch_size", 1)),
                    refill=refill_enabled(cfg))
    scores = [done[i] for i in range(len(segs))]
    return {
        **summarize(scores),
        "dataset": ev.dataset,
        "data_file": str(ev.data_file),
        "doc_range": [int(ev.doc_start), ev.doc_end] if ev.dataset == "jsonl" else None,
        "context_len": int(ev.context_len),
        "cont_len": int(ev.cont_len),
        "task": ev.task if ev.dataset == "longbench" else PASSAGE_QA_TASK if ev.dataset == "passage_qa" else None,
        "stream_tokens": source_tokens,
        "segments_sha256": segs_sha,
        # refill: the cache comes from the dense prefill (the pruned one only selects)
        "flops": schedule_flops(model, int(ev.context_len), None if refill_enabled(cfg) else pruner),
    }


def schedule_flops(model: nn.Module, context_len: int, pruner: TokenPruner | None) -> dict[str, float]:
    """Analytic prefill FLOPs of a ``context_len``-token context under the pruner's schedule vs dense
    (:func:`sdtp.flops.prefill_fraction`; the FLOPs axis of the schedule search, docs/results.md)."""
    tokens = None if pruner is None else pruner.schedule.tokens_per_layer(context_len, model.config.num_hidden_layers)
    return prefill_fraction(model.config, context_len, tokens)
