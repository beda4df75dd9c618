"""Schedule-search page: every trial of the Optuna sweep, the Pareto front (continuation NLL vs analytic prefill
FLOPs) and the paper's schedule on it.

    python -m sdtp.reports.schedule_search render --sweep results/runs/paper/schedule_search/<model>/<setup>/sweep \\
        --paper <run dir> --dense <run dir> --study sqlite:///<run>/optuna.db --out results/paper/schedule_search
    python -m sdtp.reports.schedule_search remaining --study sqlite:///<run>/optuna.db --trials 36   # resume
    python -m sdtp.reports.schedule_search sampler-seed --study sqlite:///<run>/optuna.db   # the resumed sampler's

Reads every finished trial run under ``--sweep`` (``sdtp-eval -m experiment=schedule_search``: one
``metrics.json`` per distinct schedule; trials that drew the same schedule share it), the paper's schedule and the
dense model run with the same settings (``--paper``, ``--dense``) and the study's trial states (``--study``: how
many trials ran, how many failed because their schedule did not fit). Writes ``<out>/<model>.{json,md,csv,png}``:
all points, the Pareto front over the trials and the paper point (both coordinates minimised,
:mod:`sdtp.search.pareto`), where the paper's schedule stands, and the best trial within the FLOPs budget
(``--budget``, default: the paper schedule's FLOPs). Run by ``experiments/schedule_search.sh``; never edit the page
by hand.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from sdtp.eval.stats import paired_t_interval
from sdtp.paths import REPO_ROOT
from sdtp.figures import new_figure, save_figure
from sdtp.reports.ablation_points import segment_nll
from sdtp.reports.lm_eval_pages import machine_text, minutes, num, run_config, shown_path, smaller_page, write_page_files
from sdtp.reports.paired_tables import interval_text, paired_summary
from sdtp.reports.run_summary import machine
from sdtp.search.pareto import dominates, pareto_front

SCHEMA = 1
STUDY_NAME = "schedule_search"  # hydra.sweeper.study_name in conf/experiment/schedule_search.yaml
KEYS = ("first_layer", "layer_step", "num_stages", "keep_ratio")
COLUMNS = ("kind", "first_layer", "layer_step", "num_stages", "keep_ratio", "layers", "flops_fraction",
           "prefill_gflops", "nll", "delta_nll_vs_dense", "context_kept", "pareto", "wall_s", "run")


def point(metrics: dict[str, Any], kind: str, run_dir: Path) -> dict[str, Any]:
    """One evaluated schedule (or the dense model) from its ``metrics.json``: schedule keys, NLL, FLOPs."""
    config, results = resolved_config(metrics), metrics["results"]
    pruning, schedule = config.get("pruning") or {}, (metrics.get("pruning") or {}).get("schedule")
    flops = results.get("flops") or {}
    if "fraction" not in flops:
        raise ValueError(f"{run_dir}/metrics.json has no results.flops (made before the continuation eval "
                         "reported FLOPs); rerun it with force=true")
    return {"kind": kind, **{key: pruning.get(key) if schedule else None for key in KEYS},
            "layers": schedule["layers"] if schedule else [], "flops_fraction": flops["fraction"],
            "prefill_gflops": flops["pruned_gflops"], "nll": results["nll"],
            "context_kept": results.get("avg_kept_fraction", 1.0), "wall_s": metrics.get("wall_s"),
            "run": str(run_dir), "segments": segment_nll(run_dir)}


def delta_vs(p: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any] | None:
    """Paired Δ NLL of ``p`` minus ``reference`` over the segments both scored, with its 95% t interval.

    The search picks schedules on these same segments, so an interval here says how much of a gap is segment
    noise; it does not correct the selection (a front point's advantage is optimistic).
    """
    shared = sorted(p.get("segments", {}).keys() & reference.get("segments", {}).keys())
    if not shared:
        return None
    return paired_summary(paired_t_interval([p["segments"][i] - reference["segments"][i] for i in shared]))


def resolved_config(metrics: dict[str, Any]) -> dict[str, Any]:
    """The resolved config a run recorded (``metrics.json``'s own, else its fingerprint's)."""
    return metrics.get("config") or run_config(metrics)


def read_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a finished sdtp-eval run")
    return json.loads(path.read_text())


def trial_runs(sweep: Path) -> list[Path]:
    """The finished trial run directories under a sweep directory (sorted, so the page is deterministic)."""
    return sorted(path.parent for path in sweep.rglob("metrics.json"))


def study_states(storage: str | None) -> dict[str, int]:
    """Trial count per state (COMPLETE, FAIL, RUNNING...) of the study in ``storage``; {} if it does not exist."""
    if not storage:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except KeyError:  # no such study yet
        return {}
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def stored_trials(storage: str | None) -> int:
    """Trials the study in ``storage`` holds, in any state (each one's schedule was drawn); 0 if it does not exist."""
    return sum(study_states(storage).values())


def config_sampler_seed() -> int:
    """The sampler's seed in ``conf/experiment/schedule_search.yaml`` (``hydra.sweeper.sampler.seed``)."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(REPO_ROOT / "conf" / "experiment" / "schedule_search.yaml").hydra.sweeper.sampler.seed)


def sampler_seed(storage: str | None, base: int | None = None) -> int:
    """The seed of the sampler that continues the study in ``storage``: ``base`` (default: the config's) + the trials
    the study already holds.

    A resumed sweep builds a new sampler on the stored study; with the base seed again its random stream restarts and
    it redraws the schedules the killed run drew (NSGA-II's first generation exactly, later ones mostly), which would
    count toward the wanted trials. A seed that moves with every stored trial never repeats the seed of a session
    that drew any, and a fresh study (0 trials) keeps the base seed: a search run in one go is the config's.
    """
    return (config_sampler_seed() if base is None else base) + stored_trials(storage)


def remaining_trials(storage: str | None, wanted: int) -> int:
    """Trials still to run for ``wanted`` finished ones (complete or failed; interrupted ones are redone)."""
    states = study_states(storage)
    return max(0, wanted - states.get("COMPLETE", 0) - states.get("FAIL", 0))


def paper_position(paper: dict[str, Any], others: list[dict[str, Any]]) -> list[int]:
    """Indices of the trials that dominate the paper's point (lower or equal NLL and FLOPs, one strictly)."""
    mine = (paper["nll"], paper["flops_fraction"])
    return [i for i, p in enumerate(others) if dominates((p["nll"], p["flops_fraction"]), mine)]


def build_page(trials: list[dict[str, Any]], paper: dict[str, Any], dense: dict[str, Any], runs: list[dict[str, Any]],
               states: dict[str, int], budget: float | None, command: str, wall_s: float, model: str) -> dict[str, Any]:
    """The page's content: points with deltas and front membership, the paper's standing, the best within budget."""
    if not trials:
        raise ValueError("no finished trial: did every schedule fail? see the sweep's log")
    points = [*trials, paper]
    front = set(pareto_front([(p["nll"], p["flops_fraction"]) for p in points]))
    for index, p in enumerate([*points, dense]):
        p["pareto"] = index in front
        p["delta_nll_vs_dense"] = p["nll"] - dense["nll"]
        p["delta_vs_paper"] = delta_vs(p, paper)
    budget = paper["flops_fraction"] if budget is None else budget
    within = [p for p in trials if p["flops_fraction"] <= budget + 1e-12]
    best = min(within, key=lambda p: p["nll"]) if within else None
    config = resolved_config(runs[0])
    ev = config.get("eval") or {}
    # A run's own record of its machine; only a run from before runs recorded one is taken to be from this host.
    here = machine(str((config.get("model") or {}).get("device", "cpu")))
    where, commits = machine_text([{**r, "machine": r.get("machine") or here} for r in runs])
    return {
        "schema": SCHEMA, "model": model, "command": command, "wall_s": wall_s,
        "trial_wall_s": sum(p["wall_s"] or 0.0 for p in [*trials, paper, dense]),
        "machine": where, "commits": commits, "dtype": runs[0].get("dtype"), "threads": runs[0].get("threads"),
        "scorer": (config.get("pruning") or {}).get("name"),
        "eval": {"dataset": ev.get("dataset"), "data_file": shown_path(ev.get("data_file"), config),
                 "context_len": ev.get("context_len"), "cont_len": ev.get("cont_len"),
                 "num_segments": ev.get("num_segments")},
        "study": states, "budget": budget, "best_within_budget": best,
        "paper_dominated_by": paper_position(paper, trials),
        "sizes": {"segments": int(ev.get("num_segments") or 0), "schedules": len(trials)},
        "dense": dense, "paper": paper, "trials": trials,
    }


def schedule_text(p: dict[str, Any]) -> str:
    if p["kind"] == "dense":
        return "dense"
    return f"first {p['first_layer']}, step {p['layer_step']}, {p['num_stages']} stages, r = {p['keep_ratio']}"


def markdown(page: dict[str, Any]) -> str:
    paper, dense, ev = page["paper"], page["dense"], page["eval"]
    front = sorted([p for p in [*page["trials"], paper] if p["pareto"]], key=lambda p: p["flops_fraction"])
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(page["study"].items())) or "study not recorded"
    beaten = page["paper_dominated_by"]
    standing = ("on the Pareto front" if paper["pareto"] else
                f"dominated by {len(beaten)} trial(s), e.g. {schedule_text(page['trials'][beaten[0]])} "
                f"(NLL {page['trials'][beaten[0]]['nll']:.4f} at {page['trials'][beaten[0]]['flops_fraction']:.3f})")
    best = page["best_within_budget"]
    lines = [
        f"# Schedule search: {page['model']}", "",
        "Generated by `sdtp/reports/schedule_search.py` (do not edit by hand):", "",
        f"```bash\n{page['command']}\n```", "",
        f"- **Objectives** (both minimised, a two-objective NSGA-II study): continuation NLL per token on "
        f"{ev['dataset']} `{ev['data_file']}` ({ev['num_segments']} segments of {ev['context_len']} context + "
        f"{ev['cont_len']} continuation tokens) and the analytic prefill FLOPs of the context under the schedule, "
        "as a fraction of dense (`sdtp/flops.py`; the scorer's own cost not counted).",
        f"- **Scorer**: `pruning={page['scorer']}` for every point (training-free, works for any schedule).",
        f"- **Search**: first layer, layer step, stages (within the model's depth), keep ratio r; trials: {states}; "
        f"{len(page['trials'])} distinct schedules evaluated. The paper's schedule (r = 0.9 and the model's default "
        "layers) and the dense model are evaluated with the same settings.",
        f"- **Paper schedule** ({schedule_text(paper)}): NLL {paper['nll']:.4f} "
        f"({paper['delta_nll_vs_dense']:+.4f} vs dense) at {paper['flops_fraction']:.3f} of dense prefill FLOPs: "
        f"{standing}.",
        f"- **Best within the budget** (FLOPs <= {page['budget']:.3f} of dense): "
        + (f"{schedule_text(best)}, NLL {best['nll']:.4f} ({best['nll'] - paper['nll']:+.4f} vs the paper's "
           f"schedule; paired over segments {interval_text(best['delta_vs_paper'])}) at {best['flops_fraction']:.3f}."
           if best else "no trial."),
        "- **Noise.** Δ vs the paper's schedule is paired over the segments with a 95% t interval. The search "
        "chooses schedules on these same segments, so front points that beat the paper's schedule by less than "
        "their interval are not shown to be better; confirm a chosen schedule on other segments.",
        f"- **Machine**: {page['machine']}, torch threads {page['threads']}, dtype {page['dtype']}, "
        f"git {page['commits']}; wall time {minutes(page['wall_s'])} (runs {minutes(page['trial_wall_s'])}).", "",
        "## Pareto front", "",
        "| schedule | stage layers | prefill FLOPs (of dense) | NLL | Δ vs dense | Δ vs paper [95% t CI] |",
        "|---|---|---:|---:|---:|---|",
    ]
    for p in front:
        name = schedule_text(p) + (" **(paper)**" if p["kind"] == "paper" else "")
        lines.append(f"| {name} | {p['layers']} | {p['flops_fraction']:.3f} | {p['nll']:.4f} | "
                     f"{p['delta_nll_vs_dense']:+.4f} | {interval_text(p['delta_vs_paper'])} |")
    lines += ["", f"Dense: NLL {dense['nll']:.4f} at {dense['prefill_gflops']:.2f} GFLOPs per prefill.", "",
              "## All points", "", "![front](" + page["model"] + ".png)", "",
              "| kind | schedule | FLOPs | NLL | Δ vs dense | context kept | front |", "|---|---|---:|---:|---:|---:|---|"]
    for p in sorted([*page["trials"], paper, dense], key=lambda p: p["flops_fraction"]):
        lines.append(f"| {p['kind']} | {schedule_text(p)} | {p['flops_fraction']:.3f} | {p['nll']:.4f} | "
                     f"{p['delta_nll_vs_dense']:+.4f} | {num(100 * p['context_kept'], '.1f')}% | "
                     f"{'yes' if p['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def csv_text(page: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for p in [page["dense"], page["paper"], *page["trials"]]:
        writer.writerow({**p, "layers": " ".join(map(str, p["layers"]))})
    return out.getvalue()


def plot(page: dict[str, Any], path: Path) -> Path:
    """NLL vs prefill FLOPs: every trial, the front as a step line, the paper's schedule, dense and the budget."""
    trials, paper, dense = page["trials"], page["paper"], page["dense"]
    front = sorted([p for p in [*trials, paper] if p["pareto"]], key=lambda p: p["flops_fraction"])
    fig, ax = new_figure(figsize=(7, 4.5))
    ax.scatter([p["flops_fraction"] for p in trials], [p["nll"] for p in trials], s=18, c="0.6", label="trials")
    ax.step([p["flops_fraction"] for p in front], [p["nll"] for p in front], where="post", c="tab:red", marker="o",
            label="Pareto front")
    ax.scatter([paper["flops_fraction"]], [paper["nll"]], marker="*", s=180, c="tab:blue", zorder=3,
               label="paper schedule (r=0.9)")
    ax.scatter([1.0], [dense["nll"]], marker="s", s=40, c="k", label="dense")
    ax.axvline(page["budget"], ls=":", c="0.4", label="FLOPs budget")
    ax.set_xlabel("prefill FLOPs (fraction of dense)")
    ax.set_ylabel("continuation NLL (nats / token)")
    ax.set_title(f"Schedule search: {page['model']}, scorer {page['scorer']}")
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def render(args: argparse.Namespace) -> Path:
    runs = {path: read_run(path) for path in trial_runs(args.sweep)}
    paper_metrics, dense_metrics = read_run(args.paper), read_run(args.dense)
    trials = [point(m, "trial", path) for path, m in runs.items()]
    page = build_page(trials, point(paper_metrics, "paper", args.paper), point(dense_metrics, "dense", args.dense),
                      [*runs.values(), paper_metrics, dense_metrics], study_states(args.study), args.budget,
                      args.command, args.wall_s, args.model or paper_metrics["model"])
    why = smaller_page(args.out / f"{page['model']}.json", page["sizes"])
    if why and not args.replace:
        raise SystemExit(f"schedule_search: not replacing the page: {why}; render elsewhere (--out) or pass --replace")
    return write_page_files(args.out, page, markdown, csv_text, plot)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    left = sub.add_parser("remaining", help="print how many trials are still to run")
    left.add_argument("--study", required=True, help="Optuna storage URL (sqlite:///...)")
    left.add_argument("--trials", type=int, required=True, help="finished trials wanted in total")
    seed = sub.add_parser("sampler-seed", help="print the seed of the sampler that continues the study")
    seed.add_argument("--study", required=True, help="Optuna storage URL (sqlite:///...)")
    seed.add_argument("--base", type=int, default=None, help="the search's seed (default: the config's)")
    page = sub.add_parser("render", help="write <out>/<model>.{json,md,csv,png}")
    page.add_argument("--sweep", type=Path, required=True, help="the sweep directory (hydra.sweep.dir)")
    page.add_argument("--paper", type=Path, required=True, help="run directory of the paper's schedule")
    page.add_argument("--dense", type=Path, required=True, help="run directory of the dense model")
    page.add_argument("--study", default=None, help="Optuna storage URL, for the trial states")
    page.add_argument("--budget", type=float, default=None, help="FLOPs budget (fraction of dense; default: paper's)")
    page.add_argument("--model", default=None)
    page.add_argument("--out", type=Path, default=Path("results/paper/schedule_search"))
    page.add_argument("--command", default="bash experiments/schedule_search.sh")
    page.add_argument("--wall-s", type=float, default=None)
    page.add_argument("--replace", action="store_true", help="replace a page built from more segments or schedules")
    args = parser.parse_args(argv)
    if args.what == "remaining":
        print(remaining_trials(args.study, args.trials))
    elif args.what == "sampler-seed":
        print(sampler_seed(args.study, args.base))
    else:
        print(render(args))


if __name__ == "__main__":
    main()
