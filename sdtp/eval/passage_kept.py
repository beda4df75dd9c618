"""How much of the answer-bearing passage each scorer keeps on passage-QA prompts (a diagnostic).

A passage-QA record (:mod:`sdtp.eval.passage_qa`) hides the passage its question is about among
distractors. NLL says whether a scorer lost something; this says where: the share of the target
passage's tokens alive after the last pruning stage, beside the share of the whole prompt. A scorer
that finds the passage keeps more of it than of the prompt; one that only follows position keeps it
when it happens to sit near the end. A finer set: the passage tokens whose ids occur in the gold answer
(the answer is mostly copied from the passage), the tokens a copying continuation needs.

    PYTHONPATH=. python -m sdtp.eval.passage_kept --records 16 --start 64 \\
        --scorer norm=pruning=norm \\
        --scorer sdtp=pruning=sdtp,pruning.scorer.path=results/predictors/smollm2-135m \\
        --scorer gold=pruning=oracle,pruning.scorer.target=attention,+pruning.scorer.gold=true \\
        --out results/predictors/smollm2-135m/passage_kept.json
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdtp.config import build_pruner, compose, quoted_override
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.continuation import Segment, passage_qa_cell
from sdtp.eval.predict import wants_chat_template
from sdtp.eval.scoring import prefill_context
from sdtp.models.loading import load_model
from sdtp.scorers.oracle import reveal_continuation
from sdtp.utils import write_json_atomic

# The default data file, resolved by the config (an interpolation: not quoted, unlike a --data-file path).
DOLLY = "eval.data_file=${paths.data_dir}/train/databricks_dolly_15k.jsonl"


def target_span(tokenizer: Any, ctx_ids: torch.Tensor, record: dict[str, Any]) -> torch.Tensor:
    """(n,) prompt positions of the tokens inside the record's target passage (its text, no header).

    ctx_ids: (1, N) the formatted prompt. The passage is located in the decoded prompt between its
    ``Passage k:`` header and the next block; tokens are mapped by re-tokenising with offsets, which
    must reproduce ``ctx_ids`` (ConfigError otherwise: a tokenizer whose decode does not round-trip).
    """
    text = tokenizer.decode(ctx_ids[0])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc.input_ids != ctx_ids[0].tolist():
        raise ConfigError("passage_kept: the tokenizer does not round-trip this prompt; offsets would be wrong")
    header = f"Passage {record['depth'] + 1}:\n"
    if header not in text:
        raise ConfigError(f"passage_kept: record {record['_id']}: target passage truncated out of the prompt")
    start = text.index(header) + len(header)
    end = min((i for i in (text.find("\n\nPassage ", start), text.find("\n\nAnswer the question", start)) if i >= 0),
              default=len(text))
    return torch.tensor([i for i, (a, b) in enumerate(enc.offset_mapping) if a >= start and b <= end and b > a])


def answer_tokens(ctx_ids: torch.Tensor, cont_ids: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """(k,) the positions of ``span`` whose token id also occurs in the continuation ``cont_ids`` (1, T)."""
    return span[torch.isin(ctx_ids[0, span], cont_ids[0])]


@torch.inference_mode()
def kept_shares(model: nn.Module, pruner: TokenPruner, segs: list[Segment],
                position_sets: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Per segment, after one pruned prefill: the kept share of each named position set, and ``prompt``
    (the whole prompt's). An empty set's share is NaN."""
    out = []
    for (ctx, cont), sets in zip(segs, position_sets):
        reveal_continuation(pruner.scorer, cont)  # a gold oracle labels with the real answer
        kept = prefill_context(model, ctx.to(model.device), pruner).record.final_positions[0]
        alive = torch.zeros(ctx.shape[1], dtype=torch.bool)
        alive[kept[kept >= 0].cpu()] = True
        shares = {name: float(alive[pos].float().mean()) if len(pos) else float("nan") for name, pos in sets.items()}
        out.append({**shares, "prompt": float(alive.float().mean())})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--records", type=int, default=16)
    p.add_argument("--start", type=int, default=64, help="first passage_qa record (64..127 = validation)")
    p.add_argument("--context-len", type=int, default=2048)
    p.add_argument("--data-file", default=None,
                   help="the Dolly-15k JSONL (default: <paths.data_dir>/train/databricks_dolly_15k.jsonl)")
    p.add_argument("--scorer", action="append", required=True,
                   help="NAME=override,override,... (repeatable; eval-config overrides selecting the pruner)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="JSON summary")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # A given path quoted: Hydra's override grammar refuses '=', ',' or brackets in it unquoted (e.g. a seed=0 folder).
    data_file = DOLLY if args.data_file is None else quoted_override("eval.data_file", args.data_file)
    base = [f"model={args.model}", "eval=continuation", "eval.dataset=passage_qa", data_file,
            f"eval.context_len={args.context_len}", f"eval.doc_start={args.start}", f"eval.num_segments={args.records}"]
    scorers = {name: overrides.split(",") for name, overrides in (s.split("=", 1) for s in args.scorer)}
    configs = {name: compose("eval", base + overrides) for name, overrides in scorers.items()}  # bad input fails here
    cfg = compose("eval", base + ["pruning=none"])
    model, tokenizer = load_model(cfg.model)
    chat = wants_chat_template(tokenizer, cfg.eval.chat_template)
    records, segs = passage_qa_cell(cfg.eval.data_file, tokenizer, args.context_len, int(cfg.eval.cont_len),
                                    args.start, args.records, chat)
    spans = [target_span(tokenizer, ctx, record) for (ctx, _), record in zip(segs, records)]
    sets = [{"target": span, "answer": answer_tokens(ctx, cont, span)} for (ctx, cont), span in zip(segs, spans)]
    result: dict[str, Any] = {"model": args.model, "records": [args.start, args.start + args.records],
                              "context_len": args.context_len,
                              "target_share_of_prompt": statistics.mean(len(s) / c.shape[1] for s, (c, _) in zip(spans, segs)),
                              "depth_over_passages": [r["depth"] / max(1, r["passages"] - 1) for r in records],
                              "scorers": {}}
    for name, scorer_cfg in configs.items():
        shares = kept_shares(model, build_pruner(scorer_cfg), segs, sets)
        row: dict[str, Any] = {"overrides": scorers[name]}
        for key in ("target", "answer", "prompt"):
            values = [s[key] for s in shares]
            row[f"{key}_kept"] = values
            row[f"mean_{key}_kept"] = statistics.mean(v for v in values if not math.isnan(v))
        result["scorers"][name] = row
        print(f"{name}: target passage kept {row['mean_target_kept']:.3f}, answer tokens in it "
              f"{row['mean_answer_kept']:.3f}, prompt kept {row['mean_prompt_kept']:.3f}", flush=True)
    write_json_atomic(args.out, result)
    return result


if __name__ == "__main__":
    main()
