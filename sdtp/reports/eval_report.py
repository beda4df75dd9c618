"""Collect the eval runs of scripts/eval_smollm2.sh into results/eval/<model>_limit<N>.{json,md}.

    python scripts/eval_report.py [--model smollm2-135m] [--limit 10] [--ppl-tokens 4096]

Reads the metrics.json of the sdtp-eval runs (lm_eval and perplexity, per pruning method; only the runs whose
overrides set exactly that eval.limit, resp. eval.max_tokens) and the results_*.json that lm-eval's own CLI wrote
for `--model hf`, and checks dense parity exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sdtp.paths import REPO_ROOT as ROOT
from sdtp.reports.method_runs import run_overrides
from sdtp.utils import write_json_atomic, write_text_atomic

RUNS = ROOT / "results" / "runs" / "eval"
PPL_TOKENS = 4096  # scripts/eval_smollm2.sh's default eval.max_tokens (PPL_TOKENS) for the perplexity runs


def _latest(paths: list[Path]) -> dict[str, Any] | None:
    paths = sorted(paths, key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text()) if paths else None


def overrides_of(run_dir: Path) -> dict[str, str]:
    """A run's command-line overrides as key -> value, from Hydra's record (``.hydra/overrides.yaml``)."""
    return dict(o.split("=", 1) for o in run_overrides(run_dir) if "=" in o)


def sdtp_runs(eval_name: str, model: str, pruning: str, wanted: dict[str, str]) -> dict[str, Any] | None:
    """The latest run of ``eval_name`` x ``model`` x ``pruning`` whose overrides set each key of ``wanted`` to
    exactly that value (compared parsed, not as text in the path: ``eval.limit=10`` is not ``eval.limit=100``)."""
    return _latest([p for p in (RUNS / eval_name / model / pruning).glob("*/metrics.json")
                    if all(overrides_of(p.parent).get(key) == value for key, value in wanted.items())])


def hf_run(model: str, limit: int) -> dict[str, Any] | None:
    out = RUNS / "hf_parity" / model / f"limit={limit}"
    result = _latest(list(out.glob("**/results_*.json")))
    if result is None:
        return None
    from sdtp.eval.harness import clean_metrics  # here: it imports torch, and only this reads lm-eval's own output

    wall = out / "wall.json"
    # Named as sdtp-eval names them, so the parity check pairs the same metric and filter.
    tasks = {task: {k: v for k, v in clean_metrics(res).items() if "stderr" not in k}
             for task, res in result["results"].items()}
    return {"tasks": tasks, "wall_s": json.loads(wall.read_text())["wall_s"] if wall.is_file() else None}


def build(model: str, limit: int, ppl_tokens: int = PPL_TOKENS) -> dict[str, Any]:
    lm = {p: sdtp_runs("lm_eval", model, p, {"eval.limit": str(limit)}) for p in ("none", "random")}
    ppl = {p: sdtp_runs("perplexity", model, p, {"eval.max_tokens": str(ppl_tokens)}) for p in ("none", "random")}
    hf = hf_run(model, limit)
    rows = []
    dense_tasks = (lm["none"] or {}).get("results", {}).get("tasks", {})
    for task, metrics in sorted(dense_tasks.items()):
        for metric in ("acc", "acc_norm"):
            if metric not in metrics:
                continue
            ref = hf["tasks"].get(task, {}).get(metric) if hf else None
            rnd = (lm["random"] or {}).get("results", {}).get("tasks", {}).get(task, {}).get(metric)
            rows.append({"task": task, "metric": metric, "hf": ref, "dense": metrics[metric], "random": rnd,
                         "parity": None if ref is None else ref == metrics[metric]})
    return {
        "model": model,
        "limit": limit,
        "lm_eval": rows,
        "lm_eval_wall_s": {"hf": hf and hf["wall_s"], **{p: r and r["wall_s"] for p, r in lm.items()}},
        "lm_eval_avg_kept_fraction": {p: r and r["avg_kept_fraction"] for p, r in lm.items()},
        "perplexity": {p: r and {k: r["results"][k] for k in ("perplexity", "num_tokens", "window", "stride",
                                                               "avg_kept_fraction")} | {"wall_s": r["wall_s"]}
                       for p, r in ppl.items()},
    }


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# lm-eval and perplexity on {report['model']} (5-shot, limit {report['limit']} per task)", "",
             "| task | metric | lm-eval `hf` | sdtp dense | sdtp random | dense == hf |", "|---|---|---|---|---|---|"]
    for row in report["lm_eval"]:
        lines.append(f"| {row['task']} | {row['metric']} | {_fmt(row['hf'])} | {_fmt(row['dense'])} | "
                     f"{_fmt(row['random'])} | {_fmt(row['parity'])} |")
    wall, kept = report["lm_eval_wall_s"], report["lm_eval_avg_kept_fraction"]
    lines += ["", f"Wall time (s): hf {_fmt(wall['hf'])}, sdtp dense {_fmt(wall['none'])}, sdtp random "
                  f"{_fmt(wall['random'])}. Average kept fraction of the contexts (random): {_fmt(kept['random'])}.",
              "", "| WikiText-2 test | perplexity | tokens | window/stride | avg kept fraction | wall s |",
              "|---|---|---|---|---|---|"]
    for name, res in report["perplexity"].items():
        if res:
            lines.append(f"| {name} | {res['perplexity']:.3f} | {res['num_tokens']} | "
                         f"{res['window']}/{res['stride']} | {res['avg_kept_fraction']:.3f} | {res['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=10, help="the lm-eval runs' eval.limit")
    parser.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS, help="the perplexity runs' eval.max_tokens")
    args = parser.parse_args()
    report = build(args.model, args.limit, args.ppl_tokens)
    out = ROOT / "results" / "eval"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}_limit{args.limit}"
    write_json_atomic(out / f"{stem}.json", report)
    write_text_atomic(out / f"{stem}.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
