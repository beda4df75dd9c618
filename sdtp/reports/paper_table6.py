"""Paper Table 6 page: 5-shot accuracy with the KV cache compressed to 40% (Local, H2O), alone and with
SDTP, beside dense and SDTP alone, the paper's numbers beside ours.

    python -m sdtp.reports.paper_table6 --table3 results/paper/table3/smollm2-135m.json \
        --run local=results/runs/paper/table6/smollm2-135m/local --run h2o=... --run sdtp_h2o=... \
        --run sdtp_local=... --out results/paper/table6

Reads the four finished KV runs (``sdtp-eval experiment=paper_table6 kv=streaming|h2o
pruning=none|sdtp``: ``metrics.json`` and lm-eval's per-document ``samples_<task>.jsonl``) and the dense
and SDTP runs of the Table 3 page (same tasks, documents and few-shot; checked by
:func:`sdtp.reports.run_summary.setup_differences`, a mismatch is refused), and writes
``<out>/<model>.{json,md,csv,png}``. The JSON holds every run's summary restricted to the four tasks
(:mod:`sdtp.reports.run_summary`; the KV runs' are what a fresh clone resumes from) and the table. The
page shows per task each column's accuracy over the same documents, the paired differences of every
KV column against dense and of SDTP + KV against the same KV policy alone (95% paired intervals,
p Holm-corrected over all of the page's paired tests; :mod:`sdtp.reports.paired_accuracy`), the KV
entries and prompt tokens each run kept (measured), and the paper's Table 6. Run by
``experiments/paper_table6.sh``; never edit the page by hand.
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
from sdtp.reports.lm_eval_pages import (TASKS, error_bars, eval_limit, machine_text, minutes, num, ordered_tasks,
                                        add_guard_arguments, document_sizes, guarded_out_dir, run_argument, run_config,
                                        scorer_path, write_page_files)
from sdtp.reports.paired_accuracy import (accuracy, average_difference, chance, majority_share, outcomes,
                                          paired_difference, seed_values, top_answer_share)
from sdtp.reports.paired_tables import (AVERAGE_METHOD, PAIRED_METHODS, holm_adjust, interval_text, p_text,
                                        uncorrected_p_text)
from sdtp.reports.run_summary import setup_differences, summarise
from sdtp.reports.seed_runs import SEP, merge_seed_runs, row_of, seed_label, seed_section, spread

SCHEMA = 1
# Run name -> column label, in the page's column order. dense and sdtp come from the Table 3 page.
COLUMNS = {"dense": "dense", "local": "Local", "h2o": "H2O", "sdtp_h2o": "SDTP w. H2O",
           "sdtp_local": "SDTP w. Local", "sdtp": "SDTP (no KV)"}
KV_RUNS = ("local", "h2o", "sdtp_h2o", "sdtp_local")
TABLE3_RUNS = ("dense", "sdtp")
PRUNED_RUNS = ("sdtp", "sdtp_h2o", "sdtp_local")
# A pruned row's training seeds are each compared with this run (Over training seeds): the KV policy alone.
SEED_BASE = {"sdtp": "dense", "sdtp_h2o": "h2o", "sdtp_local": "local"}
# (other, base): every KV column against dense, then SDTP + KV against the same KV policy alone.
COMPARISONS = (("local", "dense"), ("h2o", "dense"), ("sdtp_h2o", "dense"), ("sdtp_local", "dense"),
               ("sdtp_h2o", "h2o"), ("sdtp_local", "local"))
# [P] Table 6 (Llama2-7B, 5-shot, accuracy %; 40% KV; SDTP pruning 65% of the input tokens): row -> run -> acc.
PAPER: dict[str, dict[str, float]] = {
    "COPA": {"dense": 83.00, "local": 50.00, "h2o": 85.00, "sdtp_h2o": 85.00},
    "PIQA": {"dense": 78.84, "local": 50.27, "h2o": 78.62, "sdtp_h2o": 78.56},
    "WinoGrande": {"dense": 73.88, "local": 48.46, "h2o": 73.32, "sdtp_h2o": 72.53},
    "MathQA": {"dense": 31.93, "local": 23.38, "h2o": 30.99, "sdtp_h2o": 30.99},
}
PAPER_MODEL = "Llama2-7B"


def label(name: str) -> str:
    """The column label of a run name ("sdtp_h2o" -> "SDTP w. H2O")."""
    return COLUMNS.get(name, name)


def comparison_key(other: str, base: str) -> str:
    """The key of the comparison ``other − base`` in a row's ``comparisons`` ("sdtp_h2o-h2o")."""
    return f"{other}-{base}"


def percent(fraction: float | None) -> str:
    """A fraction as a percentage with one decimal ("–" for None)."""
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def paper_delta(row: str, other: str, base: str) -> float | None:
    """The paper's difference ``other − base`` on ``row`` (None when the paper has no such column)."""
    values = PAPER.get(row) or {}
    return values[other] - values[base] if other in values and base in values else None


def paper_average() -> dict[str, float]:
    """The mean of the paper's four rows per column (the paper prints no average for Table 6)."""
    return {run: math.fsum(PAPER[row][run] for row in PAPER) / len(PAPER) for run in PAPER["COPA"]}


def task_row(task: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Our numbers for one task: each run's accuracy over the (shared) documents, the paired differences."""
    documents = sorted(outcomes(runs["dense"], task))
    majority = majority_share(runs["dense"]["documents"].get(task))
    name = TASKS.get(task, task)
    return {
        "task": name, "lm_eval_task": task, "n": len(documents),
        "acc": {run: accuracy(runs[run], task, documents) for run in COLUMNS},
        "top_answer": {run: top_answer_share(runs[run], task, documents) for run in COLUMNS},
        "comparisons": {comparison_key(other, base): {**paired_difference(runs[base], runs[other], task),
                                                      "paper": paper_delta(name, other, base)}
                        for other, base in COMPARISONS},
        "chance": chance(runs["dense"], task), "majority": None if majority is None else 100.0 * majority,
        "paper": PAPER.get(name),
    }


def average_row(rows: list[dict[str, Any]], runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean over tasks of every column (each task weighs the same), stratified t intervals for the differences."""
    tasks = [r["lm_eval_task"] for r in rows]
    paper = paper_average() if [r["task"] for r in rows] == list(PAPER) else {}
    comparisons = {}
    for other, base in COMPARISONS:
        key = comparison_key(other, base)
        comparisons[key] = {
            "n": sum(r["comparisons"][key]["n"] for r in rows),
            "base_acc": math.fsum(r["acc"][base] for r in rows) / len(rows),
            "acc": math.fsum(r["acc"][other] for r in rows) / len(rows),
            "delta": average_difference(runs[base], runs[other], tasks),
            "gained": sum(r["comparisons"][key]["gained"] for r in rows),
            "lost": sum(r["comparisons"][key]["lost"] for r in rows),
            "paper": paper[other] - paper[base] if other in paper and base in paper else None,
        }
    return {"task": "Avg", "lm_eval_task": None, "n": sum(r["n"] for r in rows),
            "acc": {run: math.fsum(r["acc"][run] for r in rows) / len(rows) for run in COLUMNS},
            "top_answer": {run: None for run in COLUMNS}, "comparisons": comparisons, "chance": None,
            "majority": None, "paper": paper or None}


def check_documents(runs: dict[str, dict[str, Any]], tasks: list[str]) -> None:
    """Every run evaluated the same documents of every task (else the columns would not pair)."""
    for task in tasks:
        ids = {name: tuple(run["documents"][task]["doc_ids"]) for name, run in runs.items()}
        if len(set(ids.values())) != 1:
            counts = ", ".join(f"{name}: {len(doc_ids)}" for name, doc_ids in ids.items())
            raise ValueError(f"{task}: the runs evaluated different documents ({counts}); re-run them alike")


def table(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task every run evaluated (the paper's order first), then the average over them.

    Holm corrects the p-values over all of the page's task-level paired tests (comparisons x tasks).
    """
    found = ordered_tasks(set.intersection(*(set(run["documents"]) for run in runs.values())))
    check_documents(runs, found)
    rows = [task_row(task, runs) for task in found]
    holm_adjust([r["comparisons"][comparison_key(*c)]["delta"] for r in rows for c in COMPARISONS])
    return rows + ([average_row(rows, runs)] if rows else [])


def kept_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a run kept, as measured: KV entries after / before compression (over every layer and prefill),
    prompt tokens after the last pruning stage, tokens per layer, and KV entries against the dense cache."""
    results = metrics.get("results") or {}
    kv = metrics.get("kv") or {}
    kv_kept = kv.get("kept_fraction") if kv.get("method", "none") != "none" else 1.0
    layer = results.get("avg_layer_token_fraction") or 1.0
    return {"kv_method": kv.get("method", "none"), "kv_ratio": kv.get("ratio", 1.0), "kv_kept": kv_kept,
            "tokens_kept": metrics.get("avg_kept_fraction"), "layer_tokens": layer,
            # entries kept / entries the prefill left x entries left / dense entries (both summed over prefills)
            "kv_vs_dense": None if kv_kept is None else kv_kept * layer,
            "prompt_tokens": results.get("avg_pruned_prompt_tokens")}


def restricted(summary: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """A run summary with only ``tasks``' documents (the Table 3 runs evaluated eight tasks)."""
    return {**summary, "documents": {t: d for t, d in summary["documents"].items() if t in tasks}}


def to_csv(page: dict[str, Any]) -> str:
    """One line per task (and Avg) and comparison: accuracies, Δ with its interval and p, the paper's Δ."""
    fields = ["task", "lm_eval_task", "comparison", "n", "base_acc", "acc", "delta", "delta_low", "delta_high", "p",
              "p_holm", "gained", "lost", f"paper_{PAPER_MODEL}_delta"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in page["table"]:
        for key, c in row["comparisons"].items():
            d = c["delta"] or {}
            writer.writerow({"task": row["task"], "lm_eval_task": row["lm_eval_task"], "comparison": key,
                             "n": c["n"], "base_acc": c["base_acc"], "acc": c["acc"], "delta": d.get("mean"),
                             "delta_low": d.get("low"), "delta_high": d.get("high"), "p": d.get("p"),
                             "p_holm": d.get("p_holm"), "gained": c["gained"], "lost": c["lost"],
                             f"paper_{PAPER_MODEL}_delta": c["paper"]})
    return buffer.getvalue()


def accuracy_lines(rows: list[dict[str, Any]], marked: str | None = None) -> list[str]:
    """The main table: every column's accuracy per task, the paper's Llama2-7B row beside it; the ``marked``
    run's header gets a † (see the note under the table)."""
    runs = list(COLUMNS)
    lines = ["| task | n | chance / majority | " + " | ".join(label(r) + (" †" if r == marked else "") for r in runs)
             + " | paper "
             f"{PAPER_MODEL}: Full / Local / H2O / SDTP w. H2O |",
             "|---|---:|---:|" + "---:|" * len(runs) + "---|"]
    for r in rows:
        name = f"**{r['task']}**" if r["task"] == "Avg" else r["task"]
        base = f"{num(r['chance'], '.0f')} / {num(r['majority'], '.0f')}" if r["chance"] is not None else "–"
        paper = r["paper"]
        printed = " / ".join(f"{paper[k]:.2f}" for k in ("dense", "local", "h2o", "sdtp_h2o")) if paper else "–"
        if paper and r["task"] == "Avg":
            printed += " (mean of the rows; the paper prints none)"
        lines.append(f"| {name} | {r['n']} | {base} | " + " | ".join(num(r["acc"][k]) for k in runs)
                     + f" | {printed} |")
    return lines


def sdtp_note(page: dict[str, Any]) -> list[str]:
    """Why the SDTP (no KV) column is marked, when its pruning setup differs from the SDTP w. KV runs'."""
    if not page["sdtp_differs"]:
        return []
    return [f"† The Table 3 SDTP run differs from the SDTP w. KV runs in {', '.join(page['sdtp_differs'])}: shown "
            "for reference only (no comparison on this page uses it).", ""]


def pruning_ratio_line(page: dict[str, Any]) -> str:
    """The paper's last row: the share of prompt tokens pruned after the last stage, as measured per run."""
    cells = []
    for run in COLUMNS:
        kept = page["kept"][run]["tokens_kept"]
        cells.append("-" if run not in PRUNED_RUNS or kept is None else percent(1.0 - kept))
    return "| Pruning ratio (measured) | | | " + " | ".join(cells) + " | - / - / - / 65% |"


def difference_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per comparison and task: Δ with its interval, flips, Holm p, the paper's Δ."""
    lines = ["| comparison | task | n | Δ [95% CI] | flips: gains / losses | p (Holm) | "
             f"paper {PAPER_MODEL} Δ |", "|---|---|---:|---|---:|---:|---:|"]
    for other, base in COMPARISONS:
        key = comparison_key(other, base)
        for r in rows:
            c = r["comparisons"][key]
            d = c["delta"]
            p = uncorrected_p_text(d) if r["task"] == "Avg" else (p_text(d.get("p_holm"), d) if d else "–")
            name = f"**{r['task']}**" if r["task"] == "Avg" else r["task"]
            paper = "–" if c["paper"] is None else f"{c['paper']:+.2f}"
            lines.append(f"| {label(other)} − {label(base)} | {name} | {c['n']} | {interval_text(d, 2)} | "
                         f"{c['gained']} / {c['lost']} | {p} | {paper} |")
    return lines


def answer_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each run's top-answer share per task (near 100: one answer whatever the document)."""
    runs = list(COLUMNS)
    lines = ["| task | " + " | ".join(label(r) for r in runs) + " |", "|---|" + "---:|" * len(runs)]
    for r in rows:
        if r["task"] != "Avg":
            lines.append(f"| {r['task']} | " + " | ".join(num(r["top_answer"][k], ".0f") for k in runs) + " |")
    return lines


def kept_lines(page: dict[str, Any]) -> list[str]:
    """What each run kept, as measured (:func:`kept_summary`)."""
    lines = ["| run | KV policy | KV entries kept / entries the prefill left | prompt tokens after the last "
             "stage | tokens per layer | KV entries kept / dense cache | mean prompt tokens (pruned runs) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in COLUMNS:
        k = page["kept"][name]
        policy = "none" if k["kv_method"] == "none" else f"{k['kv_method']} {k['kv_ratio']:.0%}"
        lines.append(f"| {label(name)} | {policy} | {percent(k['kv_kept'])} | {percent(k['tokens_kept'])} | "
                     f"{percent(k['layer_tokens'])} | {percent(k['kv_vs_dense'])} | {num(k['prompt_tokens'], '.0f')} |")
    tasks = ", ".join(TASKS.get(t, t) for t in page["tasks"])
    return lines + ["", f"Summed over every prefill of each run: the KV runs' over {tasks}; dense and SDTP (no KV) "
                        "are the Table 3 runs, whose fractions cover its eight tasks. KV entries kept / dense cache = "
                        "the KV fraction x tokens per layer (SDTP's KV budget is a share of what pruning left)."]


def paper_lines() -> list[str]:
    """The paper's Table 6 as printed."""
    lines = ["| task | Full | Local (40% KV) | H2O (40% KV) | SDTP w. H2O (40% KV) |", "|---|---:|---:|---:|---:|"]
    for name, values in PAPER.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.2f}" for k in ("dense", "local", "h2o", "sdtp_h2o"))
                     + " |")
    return lines + ["| Pruning ratio | - | - | - | 65% |"]


def paper_bounds() -> dict[str, float]:
    """The paper's largest |Δ| of H2O − Full and of SDTP w. H2O − H2O over its four tasks (points)."""
    return {key: max(abs(paper_delta(row, *key.split("-"))) for row in PAPER) for key in ("h2o-dense", "sdtp_h2o-h2o")}


def header_lines(page: dict[str, Any]) -> list[str]:
    """The setup: our runs, where dense and SDTP come from, how the KV cache is compressed, machine, paper,
    statistics."""
    runs = page["runs"]
    seeds = page.get("seeds") or {}
    metrics = {name: runs[name]["metrics"] for name in COLUMNS}
    h2o = metrics["sdtp_h2o"]
    config = run_config(h2o)
    kv = config.get("kv") or {}
    schedule = (metrics["sdtp"].get("pruning") or {}).get("schedule") or {}
    keep = schedule.get("keep_fractions") or []
    others = {name: run["metrics"] for name, run in runs.items() if SEP in name}  # other training seeds' runs
    where, commits = machine_text([*metrics.values(), *others.values()])
    machine = h2o.get("machine") or {}
    walls = ", ".join([f"{label(n)} {minutes(metrics[n].get('wall_s'))}" for n in COLUMNS]
                      + [f"{label(row_of(n))} {seed_label(n)} {minutes(m.get('wall_s'))}" for n, m in others.items()])
    restored = [label(n) for n in KV_RUNS if metrics[n].get("restored_from")]
    return [
        f"- **Ours.** `sdtp-eval experiment=paper_table6` ({page['model']}): lm-eval "
        f"{(h2o.get('fingerprint') or {}).get('packages', {}).get('lm_eval')}, "
        f"{(h2o.get('results') or {}).get('num_fewshot')}-shot, the offline tasks of `sdtp/eval/tasks`, the first "
        f"documents of each task (`eval.limit={json.dumps(page['limit'])}`, the n column: a CPU time budget; "
        "`eval.limit=null` runs every document, as the paper). Local = `kv=streaming` (the first "
        f"{kv.get('keep_first')} entries, StreamingLLM's attention sinks, plus the most recent ones), H2O = `kv=h2o` "
        "(the entries with the most attention accumulated over every prompt query, plus the first "
        f"{kv.get('keep_first')} "
        f"and the last {100 * (kv.get('keep_recent') or 0):.0f}%), both keeping `kv.ratio={kv.get('ratio')}` of every "
        "layer's cache, per KV head. SDTP = `pruning=sdtp`, the shipped predictor "
        f"(`{scorer_path(metrics['sdtp'])}`), stages before layers "
        f"{schedule.get('layers')}, keep {keep[0] if keep else '?'} per stage ({100 * keep[-1]:.1f}% of the prompt "
        "after the last stage); with a KV policy it applies to what the pruned prefill left in each layer."
        + (f" {', '.join(label(r) for r in seeds)}: the per-document mean over "
           f"{' / '.join(str(len(s['members'])) for s in seeds.values())} training seeds of the predictor "
           "(correctness 0, 1/3, 2/3 or 1 with three), each seed's numbers under \"Over training seeds\"."
           if seeds else ""),
        f"- **Dense and SDTP (no KV)** are the runs of the Table 3 page (`{page['table3']}`): the same documents, "
        "few-shot examples, model, dtype and task files (checked from the runs' fingerprints, "
        "`sdtp/reports/run_summary.py` `setup_differences`), so all six columns pair document by document.",
        "- **How the KV cache is compressed in lm-eval.** Each request's context is prefilled alone (pruned for "
        "the SDTP columns); when the prefill forward ends, the policy cuts every layer's cache to its budget; the "
        "continuation (every answer choice of the context) is then scored on the compressed cache, its own tokens "
        "attending each other causally and, per head, the prompt entries kept (`sdtp/eval/lm_eval_model.py`, "
        "`sdtp/kv/cache.py`; tested against decoding the continuation token by token, "
        "`tests/test_eval_lm_harness.py`).",
        f"- **Machine.** {where} ({machine.get('device')}, {h2o.get('threads')} threads), "
        f"{str(h2o.get('dtype')).removeprefix('torch.')}; commit {commits}. Wall time: {walls}"
        + (f"; this command {minutes(page.get('wall_s'))}" if page.get("wall_s") is not None else "")
        + (f" (restored from the committed page, not re-run: {', '.join(restored)})" if restored else "")
        + ". Wall times follow the machine's load (and the KV runs prefill one context at a time, the Table 3 "
        "runs four): no speed comparison.",
        f"- **Paper.** Table 6: {PAPER_MODEL}, 5-shot, H2O and Local keeping 40% of the KV cache, SDTP pruning "
        "65% of the input tokens, GPU; accuracy in %. The paper has no SDTP w. Local column and no SDTP column "
        "in this table (its Table 3 SDTP row for Llama2-7B: COPA 85.00, PIQA 78.89, WinoGrande 72.22, "
        "MathQA 31.19).",
        "- **Statistics.** Δ is the mean over the same documents of one column's minus another's 0/1 "
        f"correctness, in points, with a 95% paired interval ({PAIRED_METHODS}); p Holm-corrected over "
        f"all {len(COMPARISONS) * (len(page['table']) - 1)} task-level tests of this page. Avg: the mean of the "
        f"task accuracies, {AVERAGE_METHOD}. Chance = 1 / number of choices; majority = the share of the most "
        "frequent gold answer; top answer = the share of documents given the run's most frequent answer.",
    ]


def expected_lines(page: dict[str, Any]) -> list[str]:
    """Which differences from the paper follow from the setup, and which would not."""
    bounds = paper_bounds()
    kept = page["kept"]
    rows = [r for r in page["table"] if r["task"] != "Avg"]
    constant = ", ".join(r["task"] for r in rows if (r["top_answer"]["dense"] or 0) >= 90) or "none here"
    near = ", ".join(r["task"] for r in rows if r["chance"] is not None and r["acc"]["dense"] - r["chance"] < 10)
    device = (page["runs"]["dense"]["metrics"].get("machine") or {}).get("device", "?")
    return [
        f"- **Expected to differ.** The accuracies: the paper evaluates {PAPER_MODEL} on a GPU, this page "
        f"{page['model']} ({device}). Dense is within 10 points of chance here on: {near or 'no task'}; where the "
        f"model gives nearly one answer to every document (dense top answer at least 90%: {constant}), its "
        "accuracy is that answer's share of the gold answers. Near chance, two columns differ mostly by which way "
        "near-ties break, and a task's Δ says little about the method. The first `n` documents of each task, with "
        "few-shot examples drawn from the evaluated split (the offline mirror has no train splits), as on the "
        "Table 3 page.",
        "- **Local.** The paper's Local column sits at chance on every task (50.00, 50.27, 48.46 on two-choice "
        "tasks, 23.38 on MathQA's five): a recent window of 40% wipes out the 7B's few-shot accuracy. The paper "
        "does not say whether its Local keeps the first tokens; ours does (StreamingLLM's attention sinks), which "
        "is known to matter for a recent-window cache, so a smaller loss here than the paper's is not a "
        "contradiction by itself. With 5-shot prompts the most recent 40% still hold the question and the last "
        "demonstrations.",
        f"- **Short contexts.** 5-shot prompts are short (mean {num(kept['sdtp_h2o']['prompt_tokens'], '.0f')} "
        "tokens for the SDTP runs here), so 40% of a layer's cache is some tens to a few hundred entries, of which "
        "the first 4 and the last 10% are always kept. With SDTP the KV budget is 40% of what pruning left in each "
        f"layer: SDTP w. H2O keeps {percent(kept['sdtp_h2o']['kv_vs_dense'])} of the dense cache's entries, H2O "
        f"alone {percent(kept['h2o']['kv_vs_dense'])} (table above).",
        f"- **Not expected to differ.** The size of the KV-only loss and of SDTP's cost on top of it: in the paper "
        f"H2O − Full is at most {bounds['h2o-dense']:.2f} points in magnitude and SDTP w. H2O − H2O at most "
        f"{bounds['sdtp_h2o-h2o']:.2f}. A task the model solves clearly above chance whose H2O − dense or SDTP w. "
        "H2O − H2O interval lies entirely below a few points' loss would mean our KV compression or its combination "
        "with pruning loses what the paper's does not.",
        "",
    ]


def render(page: dict[str, Any]) -> str:
    """The page's Markdown."""
    lines = [f"# Paper Table 6: 5-shot accuracy with 40% of the KV cache, alone and with SDTP ({page['model']})", "",
             "Generated by `sdtp/reports/paper_table6.py` (do not edit by hand). Command:", "",
             "```bash", page["command"], "```", "", *header_lines(page), "",
             "## Accuracy (%), ours beside the paper's", "",
             *accuracy_lines(page["table"], "sdtp" if page["sdtp_differs"] else None), pruning_ratio_line(page), "",
             *sdtp_note(page),
             "## Paired differences (points)", "", *difference_lines(page["table"]), "",
             "## What each run kept (measured)", "", *kept_lines(page), "",
             "Top answer: share (%) of the documents given each run's most frequent answer.", "",
             *answer_lines(page["table"]), "", *expected_lines(page),
             *seed_section(page.get("seeds") or {}, COLUMNS,
                           {name: scorer_path(run["metrics"]) for name, run in page["runs"].items()}),
             "## The paper's Table 6", "", *paper_lines(), "",
             f"![accuracy and paired differences per task]({page['model']}.png)", ""]
    return "\n".join(lines)


def render_plot(page: dict[str, Any], path: Path) -> Path:
    """Left: accuracy per task for every column, chance marked. Right: each KV column − dense with its 95%
    interval, ours and the paper's."""
    rows = page["table"]
    x = list(range(len(rows)))
    runs = list(COLUMNS)
    width = 0.8 / len(runs)
    fig, (left, right) = new_figure(1, 2, figsize=(13, 4.4))
    for j, run in enumerate(runs):
        left.bar([i - 0.4 + (j + 0.5) * width for i in x], [r["acc"][run] for r in rows], width, label=label(run))
    left.scatter([i for i, r in zip(x, rows) if r["chance"]], [r["chance"] for r in rows if r["chance"]],
                 marker="_", s=400, color="black", label="chance", zorder=3)
    left.set_ylabel("accuracy (%)")
    versus_dense = [(other, base) for other, base in COMPARISONS if base == "dense"]
    step = 0.8 / len(versus_dense)
    for j, (other, base) in enumerate(versus_dense):
        key = comparison_key(other, base)
        offset = -0.4 + (j + 0.5) * step
        mean, err = error_bars(r["comparisons"][key]["delta"] for r in rows)
        drawn = right.errorbar([i + offset for i in x], mean, yerr=err, fmt="o", capsize=3,
                               label=f"{label(other)} (ours, 95% CI)")
        paper = [r["comparisons"][key]["paper"] for r in rows]
        if any(p is not None for p in paper):
            right.scatter([i + offset for i, p in zip(x, paper) if p is not None],
                          [p for p in paper if p is not None], marker="x", color=drawn[0].get_color(),
                          label=f"{label(other)} (paper {PAPER_MODEL})")
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_ylabel("Δ vs dense (points)")
    for ax in (left, right):
        ax.set_xticks(x, [r["task"] for r in rows], fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=6)
    fig.suptitle(f"Table 6: {page['model']} vs the paper's {PAPER_MODEL} (40% KV)", fontsize=10)
    return save_figure(fig, path, dpi=110)


def build_page(table3: Path, runs: dict[str, Path], command: str, wall_s: float | None) -> dict[str, Any]:
    """The page's JSON from the Table 3 page (dense, SDTP) and the four KV run directories."""
    committed = json.loads(table3.read_text())["runs"]
    summaries = {name: summarise(path) for name, path in runs.items()}
    tasks = ordered_tasks(set.intersection(*(set(s["documents"]) for s in summaries.values())))
    summaries.update({name: restricted(run, tasks) for name, run in committed.items() if row_of(name) in TABLE3_RUNS})
    models = {name: s["metrics"].get("model") for name, s in summaries.items()}
    if len(set(models.values())) != 1:
        raise ValueError(f"the runs are of different models: {models}")
    for name in (n for n in summaries if row_of(n) in KV_RUNS):  # every comparison pairs with dense: the same documents
        changed = setup_differences(summaries["dense"], summaries[name], tasks)
        if changed:
            raise ValueError(f"{name} was not made like the Table 3 dense run it pairs with ({', '.join(changed)}): "
                             f"re-run Table 3 (make paper-table3) or this table with the same setup")
    for h2o in (n for n in summaries if row_of(n) == "sdtp_h2o"):  # each seed's SDTP w. H2O and w. Local alike
        local = h2o.replace("sdtp_h2o", "sdtp_local", 1)
        if local in summaries and setup_differences(summaries[h2o], summaries[local], tasks, with_pruning=True):
            raise ValueError(f"{h2o} and {local} were made with different pruning setups")
    merged, groups = merge_seed_runs(summaries)  # a row over several training seeds: their per-document mean
    ordered = {name: merged[name] for name in COLUMNS}
    seeds = {row: spread({m: seed_values(summaries[m], summaries[SEED_BASE[row]], tasks, TASKS, label(SEED_BASE[row]))
                          for m in members}) for row, members in groups.items()}
    return {"schema": SCHEMA, "model": models["dense"], "command": command, "wall_s": wall_s,
            "table3": str(table3), "limit": eval_limit(summaries["h2o"]["metrics"]), "tasks": tasks,
            # SDTP alone is shown for reference (no comparison uses it): where its pruning setup differs from
            # the SDTP w. KV runs' (e.g. a predictor.json edited since Table 3 ran), the page says so.
            "sdtp_differs": setup_differences(summaries["sdtp"], summaries["sdtp_h2o"], tasks, with_pruning=True),
            "kept": {name: kept_summary(s["metrics"]) for name, s in ordered.items()},
            "table": (rows := table(ordered)), "seeds": seeds, "sizes": document_sizes(rows, seeds),
            "runs": {**{name: summaries[name] for name in COLUMNS},
                     **{m: summaries[m] for members in groups.values() for m in members[1:]}}}


def write_page(table3: Path, runs: dict[str, Path], out_dir: Path, command: str, wall_s: float | None = None,
               smaller_out: Path | None = None, replace: bool = False) -> Path:
    """Render ``<out_dir>/<model>.{json,md,csv,png}`` (``smaller_out`` when the page there rests on more documents
    or seeds, unless ``replace``); returns the .md path."""
    page = build_page(table3, runs, command, wall_s)
    out_dir = guarded_out_dir(out_dir, page["model"], page["sizes"], smaller_out, replace)
    return write_page_files(out_dir, page, render, to_csv, render_plot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table3", type=Path, required=True, help="the Table 3 page JSON (dense and SDTP runs)")
    parser.add_argument("--run", type=run_argument(KV_RUNS), action="append", required=True,
                        help="<name>=<run dir> for each of " + ", ".join(KV_RUNS))
    parser.add_argument("--out", type=Path, default=Path("results/paper/table6"))
    parser.add_argument("--command", default="bash experiments/paper_table6.sh")
    parser.add_argument("--wall-s", type=float, default=None)
    add_guard_arguments(parser)
    args = parser.parse_args(argv)
    runs = dict(args.run)
    if {name for name in runs if SEP not in name} != set(KV_RUNS):
        parser.error("--run is required for each of " + ", ".join(KV_RUNS) + " (<name>@<seed>=<dir>: another "
                     "training seed's run of a row with SDTP)")
    print(write_page(args.table3, runs, args.out, args.command, args.wall_s, args.smaller_out, args.replace))


if __name__ == "__main__":
    main()
