"""Paper Table 3 page: 5-shot accuracy on eight lm-eval tasks, dense vs SDTP, the paper's numbers beside ours.

    python -m sdtp.reports.paper_table3 --run dense=results/runs/paper/table3/smollm2-135m/none \
        --run sdtp=results/runs/paper/table3/smollm2-135m/sdtp --out results/paper/table3

Reads two finished ``sdtp-eval eval=lm_eval`` runs (``metrics.json`` and lm-eval's per-document
``samples_<task>.jsonl``) and writes ``<out>/<model>.{json,md,csv,png}``: the JSON holds both runs'
summaries (:mod:`sdtp.reports.run_summary`: metrics, fingerprint, per-document correctness; small, and
what a fresh clone resumes from) and the table; the page shows per task the accuracy of each, the
paired difference SDTP − dense over the same documents with a 95% interval and a
Holm-corrected p (:mod:`sdtp.reports.paired_accuracy`), and the paper's Table 3. Run by
``experiments/paper_table3.sh``; never edit the page by hand.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from sdtp.figures import new_figure, save_figure
from sdtp.reports.lm_eval_pages import (TASKS, error_bars, eval_limit, machine_text, minutes, mixed_setups, num,
                                        ordered_tasks, add_guard_arguments, document_sizes, dtype_name, guarded_out_dir,
                                        run_argument, run_config, scorer_path, setup_difference_lines,
                                        write_page_files)
from sdtp.reports.paired_accuracy import (average_difference, chance, majority_share, paired_difference, seed_values,
                                          shared_documents, top_answer_share)
from sdtp.reports.paired_tables import (AVERAGE_METHOD, PAIRED_METHODS, holm_adjust, interval_text, p_text,
                                        uncorrected_p_text)
from sdtp.reports.run_summary import setup_differences, summarise
from sdtp.reports.seed_runs import SEP, merge_seed_runs, row_of, seed_section, spread

SCHEMA = 1
DENSE, SDTP = "dense", "sdtp"
# [P] Table 3 (accuracy %, 5-shot, SDTP pruning 65% of the input tokens): row -> model -> (full, SDTP).
PAPER: dict[str, dict[str, tuple[float, float]]] = {
    "COPA": {"Llama2-7B": (83.00, 85.00), "Mistral-7B": (90.00, 91.00), "BLOOM-7B": (69.00, 69.00)},
    "PIQA": {"Llama2-7B": (78.84, 78.89), "Mistral-7B": (84.71, 84.44), "BLOOM-7B": (73.61, 71.60)},
    "WinoGrande": {"Llama2-7B": (73.88, 72.22), "Mistral-7B": (76.64, 76.16), "BLOOM-7B": (65.59, 60.85)},
    "MathQA": {"Llama2-7B": (31.93, 31.19), "Mistral-7B": (36.45, 36.78), "BLOOM-7B": (27.81, 27.37)},
    "BoolQ": {"Llama2-7B": (60.98, 66.42), "Mistral-7B": (66.91, 71.35), "BLOOM-7B": (61.19, 61.77)},
    "CB": {"Llama2-7B": (51.79, 53.57), "Mistral-7B": (92.86, 89.29), "BLOOM-7B": (48.21, 53.57)},
    "WiC": {"Llama2-7B": (52.04, 55.17), "Mistral-7B": (57.21, 55.49), "BLOOM-7B": (50.31, 50.47)},
    "WSC": {"Llama2-7B": (36.54, 36.54), "Mistral-7B": (66.35, 65.38), "BLOOM-7B": (36.54, 36.54)},
}
PAPER_AVG = {"Llama2-7B": (58.62, 59.88), "Mistral-7B": (71.39, 71.24), "BLOOM-7B": (54.03, 53.90)}
PAPER_MODELS = ("Mistral-7B", "Llama2-7B", "BLOOM-7B")


def task_row(task: str, dense: dict[str, Any], sdtp: dict[str, Any]) -> dict[str, Any]:
    """Our numbers for one task: accuracies over the shared documents, the paired difference, flips."""
    pair = paired_difference(dense, sdtp, task)
    shared = shared_documents(dense, sdtp, task)
    majority = majority_share(dense["documents"].get(task))
    return {
        "task": TASKS.get(task, task), "lm_eval_task": task, "n": pair["n"],
        "dense_acc": pair["base_acc"], "sdtp_acc": pair["acc"], "delta": pair["delta"],
        "gained": pair["gained"], "lost": pair["lost"],
        "dense_top_answer": top_answer_share(dense, task, shared), "sdtp_top_answer": top_answer_share(sdtp, task, shared),
        "chance": chance(dense, task), "majority": None if majority is None else 100.0 * majority,
        "paper": {m: PAPER[TASKS[task]][m] for m in PAPER_MODELS} if task in TASKS else None,
    }


def average_row(rows: list[dict[str, Any]], dense: dict[str, Any], sdtp: dict[str, Any]) -> dict[str, Any]:
    """The mean over tasks (each task weighs the same, as the paper's Avg), with a stratified t interval for Δ
    (:func:`sdtp.reports.paired_accuracy.average_difference`)."""
    return {"task": "Avg", "lm_eval_task": None, "n": sum(r["n"] for r in rows),
            "dense_acc": math.fsum(r["dense_acc"] for r in rows) / len(rows),
            "sdtp_acc": math.fsum(r["sdtp_acc"] for r in rows) / len(rows),
            "delta": average_difference(dense, sdtp, [r["lm_eval_task"] for r in rows]),
            "gained": sum(r["gained"] for r in rows), "lost": sum(r["lost"] for r in rows),
            "dense_top_answer": None, "sdtp_top_answer": None, "chance": None, "majority": None,
            "paper": {m: PAPER_AVG[m] for m in PAPER_MODELS}}


def table(dense: dict[str, Any], sdtp: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task both runs evaluated (the paper's order first), then the average over those tasks."""
    found = ordered_tasks(dense["documents"].keys() & sdtp["documents"].keys())
    rows = [task_row(t, dense, sdtp) for t in found]
    holm_adjust([r["delta"] for r in rows])  # Holm over the tasks
    return rows + ([average_row(rows, dense, sdtp)] if rows else [])


def to_csv(rows: list[dict[str, Any]]) -> str:
    fields = ["task", "lm_eval_task", "n", "dense_acc", "sdtp_acc", "delta", "delta_low", "delta_high", "p", "p_holm",
              "gained", "lost", "dense_top_answer", "sdtp_top_answer", "chance", "majority"] + [f"paper_{m}_{k}" for m in PAPER_MODELS for k in ("full", "sdtp")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        d = r["delta"] or {}
        paper = r["paper"] or {}
        writer.writerow({**{k: r[k] for k in ("task", "lm_eval_task", "n", "dense_acc", "sdtp_acc", "gained", "lost",
                                                "dense_top_answer", "sdtp_top_answer", "chance", "majority")},
                         "delta": d.get("mean"), "delta_low": d.get("low"), "delta_high": d.get("high"),
                         "p": d.get("p"), "p_holm": d.get("p_holm"),
                         **{f"paper_{m}_{k}": paper[m][j] if m in paper else None
                            for m in PAPER_MODELS for j, k in enumerate(("full", "sdtp"))}})
    return buffer.getvalue()


def _paper_cell(pair: tuple[float, float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:.2f} → {pair[1]:.2f} ({pair[1] - pair[0]:+.2f})"


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| task | n | chance / majority | top answer dense / SDTP | dense | SDTP | Δ SDTP − dense [95% CI] |"
             " flips: SDTP gains / loses | p (Holm) | paper Mistral-7B full → SDTP (Δ) | paper Llama2-7B | paper BLOOM-7B |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|"]
    for r in rows:
        d = r["delta"]
        base = f"{num(r['chance'], '.0f')} / {num(r['majority'], '.0f')}" if r["chance"] is not None else "–"
        p = uncorrected_p_text(d) if r["task"] == "Avg" else (p_text(d.get("p_holm"), d) if d else "–")
        paper = r["paper"] or {}
        name = f"**{r['task']}**" if r["task"] == "Avg" else r["task"]
        top = (f"{num(r['dense_top_answer'], '.0f')} / {num(r['sdtp_top_answer'], '.0f')}"
               if r["dense_top_answer"] is not None else "–")
        lines.append(f"| {name} | {r['n']} | {base} | {top} | {num(r['dense_acc'])} | {num(r['sdtp_acc'])} | "
                     f"{interval_text(d, 2)} | {r['gained']} / {r['lost']} | {p} | "
                     + " | ".join(_paper_cell(paper.get(m)) for m in PAPER_MODELS) + " |")
    return lines


def paper_lines() -> list[str]:
    """The paper's Table 3 as printed (three models, full and SDTP)."""
    lines = ["| task | " + " | ".join(f"{m} full | {m} SDTP" for m in ("Llama2-7B", "Mistral-7B", "BLOOM-7B")) + " |",
             "|---|" + "---:|" * 6]
    for name, models in [*PAPER.items(), ("Avg", PAPER_AVG)]:
        lines.append(f"| {name} | " + " | ".join(f"{models[m][0]:.2f} | {models[m][1]:.2f}"
                                                for m in ("Llama2-7B", "Mistral-7B", "BLOOM-7B")) + " |")
    return lines


def paper_delta_range() -> tuple[float, float, float]:
    """The paper's largest |Δ| over tasks and models, and the range of its average Δ (points)."""
    deltas = [sdtp - full for models in PAPER.values() for full, sdtp in models.values()]
    averages = [sdtp - full for full, sdtp in PAPER_AVG.values()]
    return max(map(abs, deltas)), min(averages), max(averages)


def expected_lines(page: dict[str, Any]) -> list[str]:
    """Which differences from the paper follow from the setup, and which would not."""
    prompt = page["runs"][SDTP]["metrics"].get("results", {}).get("avg_pruned_prompt_tokens")
    largest, low, high = paper_delta_range()
    constant = ", ".join(r["task"] for r in page["table"] if (r.get("dense_top_answer") or 0) >= 90) or "none here"
    return [
        "- **Expected to differ.** The accuracies: the paper evaluates 7B models on a GPU, this page "
        f"{page['model']}. A 135M model is near chance on several of these tasks (MathQA has 5 choices, CB 3). "
        f"Where it gives nearly one answer to every document (top answer at least 90%: {constant}), its accuracy "
        "is that answer's share of the gold answers, the majority share or its complement; the paper's 36.54 on "
        "WSC for Llama2-7B and BLOOM-7B is such a constant answer too, the share of \"yes\". Near chance, dense and SDTP differ "
        "mostly by which way near-ties break, and a task's Δ says little about the method. The paper evaluates "
        "every document with few-shot examples from the train splits; here the first `n` documents of each task, "
        "with few-shot examples drawn from the evaluated split minus the document itself (the offline mirror "
        "has no train splits), so even the dense numbers are not lm-eval's published ones for the same model.",
        f"- **Short contexts.** 5-shot prompts are short (mean {num(prompt, '.0f')} tokens for the pruned runs "
        "here). The schedule keeps the same 34.9% of the prompt after the last stage at any length, but the "
        "always-kept tokens (the first 4 and the last 10%) take a fixed part of that budget; at these lengths the "
        "last 10% is about the evaluated question itself, so SDTP prunes mostly the few-shot demonstrations. "
        "The same holds for the paper, whose Table 3 uses the same 5-shot tasks.",
        f"- **Not expected to differ.** The size of Δ: the paper's largest |Δ| is {largest:.2f} points (any task, "
        f"any model) and its average Δ lies between {low:+.2f} and {high:+.2f}. A task the model solves clearly "
        f"above chance whose interval lies entirely below -{largest:.0f} points would mean our predictor or engine "
        "loses what the paper's does not.",
        "",
    ]


def header_lines(page: dict[str, Any]) -> list[str]:
    dense, sdtp = (page["runs"][k]["metrics"] for k in (DENSE, SDTP))
    pruning = sdtp.get("pruning") or {}
    schedule = pruning.get("schedule") or {}
    results = sdtp.get("results") or {}
    fp_cfg = run_config(sdtp)
    scorer = (fp_cfg.get("pruning") or {}).get("scorer") or {}
    machine = sdtp.get("machine") or {}
    others = [run["metrics"] for name, run in page["runs"].items() if SEP in name]  # SDTP's other training seeds
    where, commits = machine_text((dense, sdtp, *others))
    # Every run is paired with dense document by document: say so when one was not made like it.
    mixed = mixed_setups({name: run["metrics"] for name, run in page["runs"].items()})
    tasks = [r["lm_eval_task"] for r in page["table"] if r["lm_eval_task"]]
    differences = {name: setup_differences(page["runs"][DENSE], run, tasks)
                   for name, run in page["runs"].items() if name != DENSE}
    restored = [k for k in (DENSE, SDTP) if page["runs"][k]["metrics"].get("restored_from")]
    keep = schedule.get("keep_fractions") or []
    seeds = (page.get("seeds") or {}).get(SDTP)
    return [
        f"- **Ours.** `sdtp-eval experiment=paper_table3` ({page['model']}): lm-eval "
        f"{(sdtp.get('fingerprint') or {}).get('packages', {}).get('lm_eval')}, {results.get('num_fewshot')}-shot, "
        f"the offline tasks of `sdtp/eval/tasks` (prompts, choices and metrics of lm-eval's built-in tasks, "
        f"`tests/test_offline_tasks.py`), the first documents of each task (`eval.limit={json.dumps(page['limit'])}`, the n column: a CPU time budget; `eval.limit=null` runs every document, as the paper). Dense = "
        f"`pruning=none`; SDTP = `pruning=sdtp`, the shipped predictor (`{scorer_path(sdtp)}`, recency weight "
        f"{scorer.get('recency_weight') or 'from its predictor.json'}), stages before layers {schedule.get('layers')}, "
        f"keep {keep[0] if keep else '?'} per stage ({100 * keep[-1]:.1f}% of the prompt after the last stage), first "
        f"{schedule.get('keep_first')} + last {100 * (schedule.get('keep_recent') or 0):.0f}% always kept."
        + (f" SDTP's column is the per-document mean over {len(seeds['members'])} training seeds of the predictor "
           "(correctness 0, 1/3, 2/3 or 1 with three; its answer the one most seeds gave; a flip is a document "
           "whose mean is above / below dense's); each seed's numbers are under \"Over training seeds\"."
           if seeds else ""),
        f"- **Kept.** Prompt tokens kept after the last stage: {num(100 * sdtp['avg_kept_fraction'], '.1f')}% "
        f"on average; tokens per layer: {num(100 * (results.get('avg_layer_token_fraction') or math.nan), '.1f')}% "
        f"of dense; mean pruned prompt length {num(results.get('avg_pruned_prompt_tokens'), '.0f')} tokens "
        f"({results.get('pruned_prefills')} pruned prefills).",
        "- **Machine.** "
        + (f"{where} ({machine.get('device')}, {sdtp.get('threads')} threads), {dtype_name(sdtp)}, " if mixed is None
           else f"**the runs were made on different setups**: {mixed} ({sdtp.get('threads')} threads), ")
        + f"batch size {(fp_cfg.get('eval') or {}).get('batch_size')}; commit {commits}. Wall time: dense "
        f"{minutes(dense.get('wall_s'))}, SDTP {minutes(sdtp.get('wall_s'))}"
        + (f" (other seeds {', '.join(minutes(m.get('wall_s')) for m in others)})" if others else "")
        + (f"; this command {minutes(page.get('wall_s'))}" if page.get("wall_s") is not None else "")
        + (f" (restored from the committed page, not re-run: {', '.join(restored)})" if restored else "")
        + ". Wall times follow the machine's load and are no speed comparison (that is "
        "`results/bench/lm_eval_throughput.md`).",
        *setup_difference_lines(differences, DENSE),
        "- **Paper.** Table 3: Llama2-7B, Mistral-7B and BLOOM-7B, 5-shot, SDTP pruning 65% of the input "
        "tokens, GPU; accuracy in %.",
        "- **Statistics.** Δ is the mean over the same documents of SDTP's minus dense's 0/1 correctness, in "
        f"points, with a 95% paired interval ({PAIRED_METHODS}); p Holm-corrected over the tasks. Avg: "
        f"the mean of the task accuracies (as the paper's), {AVERAGE_METHOD}. Chance = 1 / number of choices; "
        "majority = the share of the most frequent gold answer among the documents; top answer = the share of "
        "documents given the run's most frequent answer (near 100: the model answers one class whatever the "
        "document).",
    ]


def render(page: dict[str, Any]) -> str:
    lines = [f"# Paper Table 3: 5-shot accuracy on eight lm-eval tasks, dense vs SDTP ({page['model']})", "",
             "Generated by `sdtp/reports/paper_table3.py` (do not edit by hand). Command:", "",
             "```bash", page["command"], "```", "", *header_lines(page), "",
             "## Accuracy (%), ours beside the paper's", "", *table_lines(page["table"]), "", *expected_lines(page),
             *seed_section(page.get("seeds") or {}, {SDTP: "SDTP"},
                           {name: scorer_path(run["metrics"]) for name, run in page["runs"].items()}),
             "## The paper's Table 3", "", *paper_lines(), "",
             f"![accuracy and paired differences per task]({page['model']}.png)", ""]
    return "\n".join(lines)


def render_plot(page: dict[str, Any], path: Path) -> Path:
    """Left: accuracy per task, dense and SDTP, chance marked. Right: Δ with its 95% interval, ours and the paper's."""
    rows = page["table"]
    names = [r["task"] for r in rows]
    x = list(range(len(rows)))
    fig, (left, right) = new_figure(1, 2, figsize=(12, 4.2))
    left.bar([i - 0.2 for i in x], [r["dense_acc"] for r in rows], 0.4, label="dense")
    left.bar([i + 0.2 for i in x], [r["sdtp_acc"] for r in rows], 0.4, label="SDTP")
    left.scatter([i for i, r in zip(x, rows) if r["chance"]], [r["chance"] for r in rows if r["chance"]],
                 marker="_", s=300, color="black", label="chance", zorder=3)
    left.set_ylabel("accuracy (%)")
    mean, err = error_bars(r["delta"] for r in rows)
    right.errorbar(x, mean, yerr=err, fmt="o", capsize=3, color="black", label=f"ours ({page['model']}), 95% CI")
    for offset, model, marker, color in ((0.15, "Mistral-7B", "s", "tab:red"), (0.3, "Llama2-7B", "^", "tab:green")):
        right.scatter([i + offset for i in x], [r["paper"][model][1] - r["paper"][model][0] if r["paper"] else math.nan
                                                for r in rows],
                      marker=marker, color=color, label=f"paper {model}")
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("Δ SDTP − dense (points)")
    for ax in (left, right):
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle(f"Table 3: {page['model']} vs the paper's 7B models", fontsize=10)
    return save_figure(fig, path, dpi=110)


def build_page(runs: dict[str, Path], command: str, wall_s: float | None) -> dict[str, Any]:
    """The page's JSON from the two run directories (``{"dense": dir, "sdtp": dir}``)."""
    summaries = {name: summarise(path) for name, path in runs.items()}
    models = {name: s["metrics"].get("model") for name, s in summaries.items()}
    if len(set(models.values())) != 1:
        raise ValueError(f"the runs are of different models: {models}")
    merged, groups = merge_seed_runs(summaries)  # SDTP over several training seeds: their per-document mean
    dense, sdtp = merged[DENSE], merged[SDTP]
    tasks = ordered_tasks(dense["documents"].keys() & sdtp["documents"].keys())
    seeds = {row: spread({m: seed_values(summaries[m], dense, tasks, TASKS) for m in members})
             for row, members in groups.items()}
    rows = table(dense, sdtp)
    return {"schema": SCHEMA, "model": models[SDTP], "command": command, "wall_s": wall_s,
            "limit": eval_limit(sdtp["metrics"]), "table": rows, "seeds": seeds, "runs": summaries,
            "sizes": document_sizes(rows, seeds)}


def write_page(runs: dict[str, Path], out_dir: Path, command: str, wall_s: float | None = None,
               smaller_out: Path | None = None, replace: bool = False) -> Path:
    """Render ``<out_dir>/<model>.{json,md,csv,png}`` (``smaller_out`` when the page there rests on more documents
    or seeds, unless ``replace``); returns the .md path."""
    page = build_page(runs, command, wall_s)
    out_dir = guarded_out_dir(out_dir, page["model"], page["sizes"], smaller_out, replace)
    return write_page_files(out_dir, page, render, lambda p: to_csv(p["table"]), render_plot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=run_argument((DENSE, SDTP)), action="append", required=True,
                        help="dense=<run dir> and sdtp=<run dir> (finished sdtp-eval eval=lm_eval runs); "
                             "sdtp@<seed>=<run dir> for each other training seed of the predictor")
    parser.add_argument("--out", type=Path, default=Path("results/paper/table3"))
    parser.add_argument("--command", default="bash experiments/paper_table3.sh")
    parser.add_argument("--wall-s", type=float, default=None)
    add_guard_arguments(parser)
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if {name for name in runs if SEP not in name} != {DENSE, SDTP} or any(row_of(n) == DENSE for n in runs if SEP in n):
        parser.error("--run dense=<dir> and --run sdtp=<dir> are both required (sdtp@<seed>=<dir>: another "
                     "training seed's SDTP run)")
    print(write_page(runs, args.out, args.command, args.wall_s, args.smaller_out, args.replace))


if __name__ == "__main__":
    main()
