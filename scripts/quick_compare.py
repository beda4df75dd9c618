"""Quick long-context comparison of token scorers and KV policies on the embedded model.

    python scripts/quick_compare.py [--prompts 6 --context 1536 --continuation 32] [--sdtp-path DIR]

For ``--prompts`` non-overlapping WikiText-2 test spans, the first ``--context`` tokens are
prefilled (pruned by the method's scorer at the default schedule, then KV-compressed if the
method has a KV policy) and the next ``--continuation`` tokens are fed one at a time on top of
that cache (teacher forcing, never pruned). Reported per method: continuation perplexity, top-1
agreement with the dense model's next-token predictions, average prompt tokens per layer, KV
entries kept, prefill seconds (noisy: shared CPU). Writes results/compare/quick_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from sdtp.config import REPO_ROOT, build_pruner, compose
from sdtp.engine.cache import cache_lengths
from sdtp.kv import KVCompressor, build_kv_policy
from sdtp.models import load_model
from sdtp.models.compat import cache_kwargs, output_cache
from sdtp.utils import write_json_atomic

log = logging.getLogger("quick_compare")
TOKEN_PRUNERS = ("none", "random", "positional", "norm", "lazyllm", "lexical", "gemfilter", "fastkv")
KV_COMBOS = (("none", "streaming"), ("none", "h2o"), ("none", "snapkv"), ("lazyllm", "h2o"))


@torch.inference_mode()
def continuation_logits(model, ids: torch.Tensor, context: int, pruner, policy) -> tuple[torch.Tensor, dict]:
    """(C, V) logits predicting ids[context:], plus stats of the pruned / compressed prefill."""
    with ExitStack() as stack:
        if pruner is not None:
            stack.enter_context(pruner(model))
        if policy is not None:
            stack.enter_context(KVCompressor(policy)(model))
        start = time.perf_counter()
        out = model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        cache, logits = output_cache(out), [out.logits[0, -1].float()]
        kept_kv = sum(cache_lengths(cache))
        for pos in range(context, ids.shape[1] - 1):
            out = model(input_ids=ids[:, pos : pos + 1], **cache_kwargs(cache), use_cache=True)
            cache = output_cache(out)
            logits.append(out.logits[0, -1].float())
    record = pruner.last_prefill if pruner is not None else None
    layers = model.config.num_hidden_layers
    tokens_per_layer = sum(record.tokens_per_layer) / (layers * context) if record else 1.0
    full_kv = sum(record.tokens_per_layer) if record else layers * context
    stats = {"prefill_s": prefill_s, "tokens_per_layer": tokens_per_layer, "kv_kept": kept_kv / (layers * context),
             "kv_of_prefill": kept_kv / full_kv}
    return torch.stack(logits), stats


def evaluate(model, spans: list[torch.Tensor], context: int, pruner, policy, dense_top1=None) -> dict:
    nll, agree, count, stats_sum = 0.0, 0, 0, {}
    top1 = []
    for i, ids in enumerate(spans):
        logits, stats = continuation_logits(model, ids, context, pruner, policy)
        target = ids[0, context:]
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        pred = logits.argmax(-1)
        top1.append(pred)
        if dense_top1 is not None:
            agree += int((pred == dense_top1[i]).sum())
        count += target.numel()
        for key, value in stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value / len(spans)
    return {"ppl": math.exp(nll / count), "top1_agreement": agree / count if dense_top1 is not None else 1.0,
            **{k: round(v, 4) for k, v in stats_sum.items()}, "_top1": top1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--context", type=int, default=1536)
    parser.add_argument("--continuation", type=int, default=32)
    parser.add_argument("--sdtp-path", default=None, help="trained predictor dir (adds sdtp and sdtp+h2o rows)")
    parser.add_argument("--only", default=None, help="comma-separated method names to (re)run, e.g. sdtp,sdtp+h2o; "
                        "dense always runs (agreement reference); other rows of an existing output are kept")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "compare")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = compose("generate", [f"model={args.model}"])
    model, tokenizer = load_model(base.model, cache_dir=base.paths.cache_dir)
    text = (Path(base.paths.data_dir) / "lm" / "wiki.test.raw").read_text()
    length = args.context + args.continuation
    ids = tokenizer(text[: 12 * length * args.prompts], return_tensors="pt").input_ids
    step = ids.shape[1] // args.prompts
    spans = [ids[:, i * step : i * step + length] for i in range(args.prompts)]
    assert all(s.shape[1] == length for s in spans), "not enough WikiText tokens"
    methods = [(p, "none") for p in TOKEN_PRUNERS] + list(KV_COMBOS)
    if args.sdtp_path:
        methods += [("sdtp", "none"), ("sdtp", "h2o")]
    out_json = args.out / f"quick_{args.model}.json"
    rows = json.loads(out_json.read_text())["rows"] if args.only and out_json.exists() else {}
    wanted = None if args.only is None else {"none", *args.only.split(",")}
    dense_top1 = None
    for pruning, kv in methods:
        if wanted is not None and (pruning if kv == "none" else f"{pruning}+{kv}") not in wanted:
            continue
        overrides = [f"model={args.model}", f"pruning={pruning}", f"kv={kv}"]
        if pruning == "sdtp":
            overrides.append(f"pruning.scorer.path={args.sdtp_path}")
        cfg = compose("generate", overrides)
        name = pruning if kv == "none" else f"{pruning}+{kv}@{cfg.kv.ratio:g}"
        torch.manual_seed(0)
        row = evaluate(model, spans, args.context, build_pruner(cfg), build_kv_policy(cfg), dense_top1)
        top1 = row.pop("_top1")
        if name == "none":
            dense_top1 = top1
        rows[name] = row
        log.info("%-22s %s", name, json.dumps(row))
    setup = {k: v for k, v in vars(args).items() if k != "out"} | {"data": "wikitext-2 test", "threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_json, {"setup": {k: str(v) for k, v in setup.items()}, "rows": rows})
    header = ["method", "ppl", "top1_agreement", "tokens_per_layer", "kv_kept", "prefill_s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name] + [f"{row[h]:.4g}" for h in header[1:]]) + " |")
    md = "\n".join(lines) + f"\n\nSetup: {json.dumps(setup)}\n"
    (args.out / f"quick_{args.model}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
