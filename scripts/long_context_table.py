"""Collect sdtp-eval metrics.json files (longbench / needle / passage_*) into a markdown table.

    python scripts/long_context_table.py [RUNS_DIR [OUT_MD]]   # defaults: results/runs/eval, the committed page

Times are the per-sample prefill / decode sums from predictions.jsonl (complete even for resumed runs). Runs
without a score (nothing evaluated) are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdtp.utils import write_text_atomic

ROW = ("| {eval} | {setting} | {model} | {pruning} | {n} | {score} | {tokens:.0f} | {kept:.3f} | {layer:.3f} "
       "| {prefill:.1f} | {decode:.1f} |")


def row(metrics: dict) -> str:
    res = metrics["results"]
    if metrics["eval"] == "longbench":
        setting = ", ".join(f"{k} (max_new {res['max_new_tokens'][k]})" for k in res["datasets"])
        score, n = f"{res['avg']:.2f}", sum(res["num_samples"].values())
    else:
        setting = ", ".join(res.get("by_length", {}))
        score, n = f"{res['score']:.2f}", res["num_samples"]
    return ROW.format(eval=metrics["eval"], setting=setting, model=metrics["model"], pruning=metrics["pruning"]["name"],
                      n=n, score=score, tokens=res["avg_prompt_tokens"], kept=res["avg_kept_fraction"],
                      layer=res["avg_layer_token_fraction"], prefill=res["prefill_s"], decode=res["decode_s"])


def main(root: str, out: str) -> None:
    runs = [json.loads(f.read_text()) for f in sorted(Path(root).rglob("metrics.json"))]
    runs = [m for m in runs if m.get("eval") in ("longbench", "needle", "passage_retrieval", "passage_count")
            and (m.get("results") or {}).get("avg" if m["eval"] == "longbench" else "score") is not None]
    lines = [
        "| eval | setting | model | pruning | samples | score | avg prompt tokens | kept (last stage) | "
        "layer-token fraction | prefill s (sum) | decode s (sum) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[row(m) for m in sorted(runs, key=lambda m: (m["eval"], m["model"], m["pruning"]["name"] != "none"))],
    ]
    write_text_atomic(Path(out), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="results/runs/eval", help="where the runs' metrics.json lie")
    parser.add_argument("out", nargs="?", default="results/eval/long_context_smollm2-135m.md")
    args = parser.parse_args()
    main(args.root, args.out)
