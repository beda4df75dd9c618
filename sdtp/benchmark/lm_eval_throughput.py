"""lm-eval throughput of the ``sdtp`` adapter: dense vs pruned log-likelihood at several batch sizes.

    make bench-lm-eval                                    # the committed page, 2 threads
    python -m sdtp.benchmark.lm_eval_throughput --limit 20 --batch-sizes 1 8 --pruning none sdtp

Every configuration (batch size x ``--pruning``: ``none`` = plain HFLM, ``shared`` = the adapter with nothing
pruned, ``sdtp`` = the shipped predictor, ``random``) runs lm-eval's ``simple_evaluate`` through the same code as
``sdtp-eval eval=lm_eval`` (:func:`sdtp.eval.harness.evaluate_lm`) on the same documents of the
same offline multiple-choice tasks (same few-shot seed, so identical requests), one model loaded
once. Per configuration it records

* ``wall_s``: the whole ``simple_evaluate`` call (request building, model, metrics): lm-eval wall time;
* ``model_s``: the time inside the adapter's log-likelihood calls (``_loglikelihood_tokens``);
* ``requests_per_s`` = requests / ``model_s``; ``tokens_per_s`` = request tokens / ``model_s``, where
  the request tokens are context + continuation of every request after HFLM's left truncation, the
  same number for every configuration (so it is a work-normalised rate, not the tokens a pruned
  model actually processed: those are the point of pruning);
* accuracy per task and the kept fractions, so a speed-up can be read next to what it costs.

The adapter saves work in two ways: it prefills each context once and scores all its choices on that cache
(HFLM runs context + choice once per choice), and it prunes. ``shared`` (a random scorer at keep ratio 1.0:
every token kept) is the first alone, so dense / shared is what sharing the context saves and shared / pruned
what pruning saves.

``batch_size`` means rows of the expensive forward on both sides: requests for HFLM, contexts
prefilled together for the pruned adapter (module docstring of :mod:`sdtp.eval.lm_eval_model`).
One untimed warm-up configuration runs first. The JSON and Markdown pages (``--out`` stem) are
rewritten atomically after every configuration, so an interrupted run leaves a valid partial page.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdtp.benchmark.environment import MALLOC_ENV, ensure_malloc_env, environment
from sdtp.config import REPO_ROOT, build_pruner, compose, offline_by_default
from sdtp.eval.harness import clean_metrics, evaluate_lm, make_lm
from sdtp.models import load_model
from sdtp.paths import portable_text
from sdtp.utils import set_threads, write_json_atomic, write_text_atomic

SCHEMA = "sdtp-lm-eval-throughput/1"
MODULE = "sdtp.benchmark.lm_eval_throughput"
DEFAULT_OUT = REPO_ROOT / "results" / "bench" / "lm_eval_throughput"
# The adapter's shared-context path with nothing pruned: the baseline that isolates what pruning itself saves.
SHARED = "shared"
SHARED_OVERRIDES = ("pruning=random", "pruning.keep_ratio=1.0")


@dataclass
class Meter:
    """What went through the adapter's ``_loglikelihood_tokens``: requests, their tokens, seconds inside."""

    requests: int = 0
    request_tokens: int = 0
    seconds: float = 0.0


def meter(lm: Any) -> Meter:
    """Count and time every ``_loglikelihood_tokens`` call of ``lm`` (wraps it on this instance only)."""
    stats, inner = Meter(), lm._loglikelihood_tokens

    def timed(requests: list, *args: Any, **kwargs: Any) -> list:
        stats.requests += len(requests)
        stats.request_tokens += sum(min(len(ctx) + len(cont), lm.max_length + 1) for _, ctx, cont in requests)
        start = time.perf_counter()
        try:
            return inner(requests, *args, **kwargs)
        finally:
            stats.seconds += time.perf_counter() - start

    lm._loglikelihood_tokens = timed
    return stats


def eval_overrides(args: argparse.Namespace) -> list[str]:
    """The ``sdtp-eval eval=lm_eval`` overrides every configuration shares."""
    return ["eval=lm_eval", f"model={args.model}", f"eval.tasks=[{','.join(args.tasks)}]", f"eval.limit={args.limit}",
            f"eval.num_fewshot={args.num_fewshot}", "eval.log_samples=false", "eval.bootstrap_iters=0"]


def run_config(model: Any, tokenizer: Any, overrides: Sequence[str], pruning: str, batch_size: int) -> dict[str, Any]:
    """One timed ``simple_evaluate`` (pruner built before the clock starts, fresh per configuration)."""
    method = list(SHARED_OVERRIDES) if pruning == SHARED else [f"pruning={pruning}"]
    cfg = compose("eval", [*overrides, *method, f"eval.batch_size={batch_size}"])
    lm = make_lm(cfg, model, tokenizer, build_pruner(cfg))
    stats = meter(lm)
    start = time.perf_counter()
    out = evaluate_lm(lm, cfg)
    wall = time.perf_counter() - start
    tasks = {task: {name: value for name, value in clean_metrics(res).items() if name in ("acc", "acc_norm")}
             for task, res in out["results"].items()}
    return {
        "pruning": pruning,
        "batch_size": batch_size,
        "wall_s": wall,
        "model_s": stats.seconds,
        "requests": stats.requests,
        "request_tokens": stats.request_tokens,
        "requests_per_s": stats.requests / stats.seconds if stats.seconds else None,
        "tokens_per_s": stats.request_tokens / stats.seconds if stats.seconds else None,
        "docs": {task: n.get("effective") for task, n in out.get("n-samples", {}).items()},
        "tasks": tasks,
        **lm.kept.summary(),
    }


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def render_markdown(report: dict[str, Any]) -> str:
    """A header saying how the numbers were made, then one row per configuration."""
    env, setup = report["environment"], report["setup"]
    dense = {row["batch_size"]: row for row in report["results"] if row["pruning"] == "none"}
    shared = {row["batch_size"]: row for row in report["results"] if row["pruning"] == SHARED}
    tasks = list(setup["tasks"])
    lines = [
        "# lm-eval throughput: dense vs pruned log-likelihood (`sdtp` adapter)",
        "",
        f"<!-- generated by {MODULE}; do not edit by hand -->",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Model `{setup['model']}` ({env['dtype']}, {env['attn_implementation']}), {env['threads']} threads on "
        f"{env['cpu_model']} ({env['cpu_count']} CPUs), torch {env['torch']}, transformers {env['transformers']}, "
        f"lm-eval {setup['lm_eval']}, commit `{env['git_commit']}`, {report['finished_at']}.",
        f"Tasks {', '.join(tasks)}: first {setup['limit']} documents each, {setup['num_fewshot']}-shot. "
        "`batch` = rows of the expensive forward: requests for dense HFLM, contexts prefilled together for "
        "the pruned adapter (all their choices then scored in one forward on the pruned cache). "
        "`wall` = the whole `simple_evaluate` call, `model` = time inside the log-likelihood calls; "
        "req/s and tok/s divide the requests and their context + continuation tokens (the same for every row) "
        "by `model`. `speed-up` = dense time / this time at the same batch size (wall, model). `kept` = "
        "token-weighted kept fraction of the pruned contexts after the last stage. `shared` = the adapter with "
        "nothing pruned (random scorer, keep ratio 1.0): each context is prefilled once and its choices scored on "
        "that cache, where HFLM runs context + choice per choice. So dense / shared is what sharing the context "
        "saves, and `vs shared` (shared model time / this one) is what pruning itself saves.",
        "",
        "| batch | pruning | wall s | model s | requests | req/s | tok/s | speed-up wall | speed-up model | "
        "vs shared | kept | " + " | ".join(f"acc {task}" for task in tasks) + " |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks),
    ]
    for row in report["results"]:
        ref = dense.get(row["batch_size"])
        wall = ref["wall_s"] / row["wall_s"] if ref else None
        model = ref["model_s"] / row["model_s"] if ref and row["model_s"] else None
        base = shared.get(row["batch_size"])
        pruned = base["model_s"] / row["model_s"] if base and row["model_s"] and row["pruning"] != "none" else None
        accs = [_fmt(row["tasks"].get(task, {}).get("acc"), ".3f") for task in tasks]
        lines.append(
            f"| {row['batch_size']} | {row['pruning']} | {row['wall_s']:.1f} | {row['model_s']:.1f} | "
            f"{row['requests']} | {_fmt(row['requests_per_s'], '.2f')} | {_fmt(row['tokens_per_s'], '.0f')} | "
            f"{_fmt(wall, '.2f', 'x')} | {_fmt(model, '.2f', 'x')} | {_fmt(pruned, '.2f', 'x')} | "
            f"{row['avg_kept_fraction']:.3f} | "
            + " | ".join(accs) + " |"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """``out``.json and ``out``.md, each written atomically."""
    write_json_atomic(out.with_suffix(".json"), report)
    write_text_atomic(out.with_suffix(".md"), render_markdown(report))


def command_line() -> str:
    """The command as run, with the environment variables that change its numbers or its reach."""
    names = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *MALLOC_ENV]
    env = [f"{name}={os.environ[name]}" for name in names if name in os.environ]
    return portable_text(shlex.join([*env, "python", "-m", MODULE, *sys.argv[1:]]))


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Warm up, then every (batch size, pruning) configuration; the report is rewritten after each."""
    import lm_eval

    threads = set_threads(args.threads)
    overrides = eval_overrides(args)
    base = compose("eval", overrides)
    model, tokenizer = load_model(base.model, cache_dir=base.paths.cache_dir)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command_line(),
        "environment": environment(model, "cpu"),
        "setup": {"model": args.model, "tasks": list(args.tasks), "limit": args.limit,
                  "num_fewshot": args.num_fewshot, "batch_sizes": list(args.batch_sizes),
                  "pruning": list(args.pruning), "threads": threads, "lm_eval": lm_eval.__version__},
        "results": [],
    }
    if args.warmup:
        log("warm-up (untimed): dense, batch 1, 2 documents")
        warm = argparse.Namespace(**{**vars(args), "limit": 2})
        run_config(model, tokenizer, eval_overrides(warm), "none", 1)
    for batch_size in args.batch_sizes:
        for pruning in args.pruning:
            row = run_config(model, tokenizer, overrides, pruning, batch_size)
            log(f"batch {batch_size} pruning={pruning}: wall {row['wall_s']:.1f} s, model {row['model_s']:.1f} s, "
                f"{row['requests_per_s']:.2f} req/s")
            report["results"].append(row)
            report["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            write_report(report, Path(args.out))
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["sdtp_piqa", "sdtp_arc_easy"])
    parser.add_argument("--limit", type=int, default=150, help="documents per task")
    parser.add_argument("--num-fewshot", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--pruning", nargs="+", default=["none", SHARED, "sdtp", "random"],
                        help=f"pruning configs (conf/pruning/), 'none' = plain HFLM, '{SHARED}' = the adapter unpruned")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output stem: <out>.json and <out>.md")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    return parser.parse_args(argv)


def main() -> None:
    ensure_malloc_env(MODULE)
    offline_by_default()
    run(parse_args())


if __name__ == "__main__":
    main()
