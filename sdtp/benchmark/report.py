"""Derived numbers (speedups, target checks), the Markdown table and the plot of a benchmark run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtp.figures import new_figure, save_figure

MIB = 1024 * 1024


def _ratio(entry: dict[str, Any], key: str) -> float | None:
    variants = entry["variants"]
    if "pruned" not in variants:
        return None
    return variants["dense"][key]["median"] / variants["pruned"][key]["median"]


def speedups(entry: dict[str, Any]) -> dict[str, Any]:
    """Dense/pruned ratios of medians next to the analytic FLOPs ratios (limits to approach)."""
    flops, variants = entry["flops"], entry["variants"]
    out: dict[str, Any] = {
        "prefill": _ratio(entry, "prefill_s"),
        "decode": _ratio(entry, "decode_ms_per_token"),
        "end_to_end": _ratio(entry, "end_to_end_s"),
        "analytic_prefill": flops["prefill_ratio"],
        "analytic_decode": flops["decode_ratio"],
        "analytic_end_to_end": flops["end_to_end_ratio"],
        "flops_reduction_prefill": flops["prefill_reduction"],
        "flops_reduction_end_to_end": 1 - 1 / flops["end_to_end_ratio"],
        "compression_ratio": flops["compression_ratio"],
    }
    if out["prefill"] is not None:
        out["prefill_vs_analytic"] = out["prefill"] / out["analytic_prefill"]
        dense, pruned = variants["dense"], variants["pruned"]
        out["kv_cache_reduction"] = 1 - pruned["kv_cache_bytes"] / dense["kv_cache_bytes"]
        # the KV entries pruning saves (sliding layers cache only their window); older runs: 1 - tau
        out["expected_kv_reduction"] = flops.get("kv_reduction", 1 - 1 / flops["compression_ratio"])
        out["predictor_time_share"] = pruned.get("predictor_time_share")
        out["predictor_flops_share"] = flops["predictor_share"]
        # Peak RSS on a CPU, the CUDA allocator's peak on a GPU (the key keeps its name: committed pages read it).
        peak_d, peak_p = (v.get("memory", {}).get("peak_rss_bytes") or v.get("memory", {}).get("peak_cuda_bytes")
                          for v in (dense, pruned))
        if peak_d and peak_p:
            out["peak_rss_reduction"] = 1 - peak_p / peak_d
    return out


def check_targets(report: dict[str, Any], targets: dict[str, Any]) -> dict[str, Any]:
    """Each issue target as ``{name, seq_len, value, threshold, met}``; ``all_met`` over them."""
    checks = []

    def add(name: str, n: int, value: float | None, threshold: float, at_least: bool = True) -> None:
        if value is not None:
            met = value >= threshold if at_least else value <= threshold
            checks.append({"name": name, "seq_len": n, "value": value, "threshold": threshold,
                           "kind": ">=" if at_least else "<=", "met": bool(met)})

    for entry in report["results"]:
        n, s = entry["seq_len"], entry["speedup"]
        if s.get("prefill") is None:
            continue
        prefill_targets = {int(k): v for k, v in (targets.get("prefill_speedup") or {}).items()}
        if n in prefill_targets:
            add("prefill_speedup", n, s["prefill"], prefill_targets[n])
        if n >= targets.get("prefill_vs_analytic_from", 0):
            add("prefill_vs_analytic", n, s["prefill_vs_analytic"], targets["prefill_vs_analytic"])
        if n >= targets.get("decode_speedup_from", 0):
            add("decode_speedup", n, s["decode"], targets["decode_speedup"])
        add("predictor_flops_share", n, s["predictor_flops_share"], targets["predictor_flops_share"], False)
        add("predictor_time_share", n, s["predictor_time_share"], targets["predictor_time_share"], False)
        # KV bytes must shrink by the average pruned fraction (1% slack for rounding).
        add("kv_cache_reduction", n, s["kv_cache_reduction"], s["expected_kv_reduction"] - 0.01)
    return {"spec": targets, "checks": checks, "all_met": all(c["met"] for c in checks) if checks else None}


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def render_markdown(report: dict[str, Any]) -> str:
    """Table 2 layout (per length: dense row, pruned row with speedups) plus the efficiency table."""
    env, pruning = report["environment"], report["pruning"]
    lines = [
        f"# sdtp-bench: {report['model']}, pruning={pruning.get('name')}",
        "",
        f"Schedule: stages before layers {pruning.get('stage_layers')}, keep_ratio {pruning.get('keep_ratio')}, "
        f"keep_first {pruning.get('keep_first')}, keep_recent {pruning.get('keep_recent')}. "
        f"Predictor: {pruning.get('predictor') or 'none (training-free scorer)'}.",
        f"Batch 1, {report['settings']['new_tokens']} generated tokens, median of {report['settings']['repeats']} "
        f"interleaved repeats after {report['settings']['warmup']} warm-up. {env['device']} ({env['cpu_model']}, "
        f"{env['threads']} threads), {env['dtype']}, attention {env['attn_implementation']}, torch {env['torch']}, "
        f"transformers {env['transformers']}, commit {env['git_commit']}. Allocator: "
        + ", ".join(f"{k}={v}" for k, v in env["allocator"].items()) + ".",
        "",
        "| Seq. length | Method | GFLOPs Prefill | GFLOPs E2E | Latency Prefill (s) | Decode (ms/token) "
        "| Latency End2End (s) | KV cache (MiB) | Peak memory (MiB) | of which activations + KV (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["results"]:
        n, flops, s = entry["seq_len"], entry["flops"], entry["speedup"]
        for name, v in entry["variants"].items():
            f = flops["dense" if name == "dense" else "pruned"]
            pruned = name != "dense"
            memory = v.get("memory", {})
            peak = memory.get("peak_rss_bytes") or memory.get("peak_cuda_bytes")
            delta = memory.get("peak_rss_delta_bytes")

            def gain(key: str, sign: str = "↑", fmt: str = ".2f", suffix: str = "×") -> str:
                return f" ({sign}{s[key]:{fmt}}{suffix})" if pruned and s.get(key) is not None else ""

            lines.append(
                f"| {n} | {'dense' if not pruned else pruning.get('name')} | {f['prefill']['total'] / 1e9:.1f} "
                f"| {f['end_to_end']['total'] / 1e9:.1f} | {v['prefill_s']['median']:.3f}{gain('prefill')} "
                f"| {v['decode_ms_per_token']['median']:.1f}{gain('decode')} "
                f"| {v['end_to_end_s']['median']:.2f}{gain('end_to_end')} "
                f"| {v['kv_cache_bytes'] / MIB:.1f} | {_fmt(peak / MIB if peak else None, '.0f')}"
                + (f" (↓{100 * s['peak_rss_reduction']:.1f}%)" if pruned and s.get("peak_rss_reduction") else "")
                + f" | {_fmt(delta / MIB if delta else None, '.0f')} |"
            )
    lines += ["", "| Seq. length | FLOPs reduction prefill / E2E | 1/τ | analytic prefill ratio | measured prefill "
              "speedup (spread) | measured / analytic | decode speedup | E2E speedup (analytic) | KV reduction "
              "(expected) | predictor share FLOPs / time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in report["results"]:
        s, paired = entry["speedup"], entry.get("paired_prefill_speedup")
        if s.get("prefill") is None:
            continue
        spread = f" ({paired['min']:.2f}–{paired['max']:.2f})" if paired else ""
        lines.append(
            f"| {entry['seq_len']} | {100 * s['flops_reduction_prefill']:.1f}% / {100 * s['flops_reduction_end_to_end']:.1f}% "
            f"| {s['compression_ratio']:.2f} | {s['analytic_prefill']:.2f}× | {s['prefill']:.2f}×{spread} "
            f"| {s['prefill_vs_analytic']:.2f} | {s['decode']:.2f}× | {s['end_to_end']:.2f}× ({s['analytic_end_to_end']:.2f}×) "
            f"| {100 * s['kv_cache_reduction']:.1f}% ({100 * s['expected_kv_reduction']:.1f}%) "
            f"| {100 * s['predictor_flops_share']:.2f}% / {_fmt(100 * (s['predictor_time_share'] or 0), '.2f', '%')} |"
        )
    targets = report.get("targets", {})
    if targets.get("checks"):
        lines += ["", "Targets (issue #6; calibrated on a bf16 Sapphire Rapids CPU): "
                  + ", ".join(f"{c['name']}@{c['seq_len']} {c['value']:.3f} {c['kind']} {c['threshold']:.3f} "
                              f"{'met' if c['met'] else 'NOT met'}" for c in targets["checks"]) + "."]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Measured speedups vs the analytic FLOPs ratio, and FLOPs / KV reduction, against prompt length."""
    rows = [e for e in report["results"] if e["speedup"].get("prefill") is not None]
    fig, (left, right) = new_figure(1, 2, figsize=(10, 4))
    if rows:
        n = [e["seq_len"] for e in rows]
        for key, label, style in (("prefill", "prefill (measured)", "o-"), ("end_to_end", "end to end (measured)", "s-"),
                                  ("decode", "decode step (measured)", "^-"),
                                  ("analytic_prefill", "prefill FLOPs ratio (analytic)", "o--"),
                                  ("analytic_end_to_end", "E2E FLOPs ratio (analytic)", "s--")):
            left.plot(n, [e["speedup"][key] for e in rows], style, label=label)
        for key, label, style in (("flops_reduction_prefill", "prefill FLOPs", "o-"),
                                  ("flops_reduction_end_to_end", "E2E FLOPs", "s-"),
                                  ("kv_cache_reduction", "KV-cache bytes", "^-")):
            right.plot(n, [100 * e["speedup"][key] for e in rows], style, label=label)
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(n, [str(x) for x in n])
            ax.set_xlabel("prompt tokens")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    left.set_ylabel("speedup over dense (×)")
    left.axhline(1.0, color="grey", lw=0.8)
    right.set_ylabel("reduction (%)")
    fig.suptitle(f"{report['model']}, pruning={report['pruning'].get('name')} ({report['environment']['dtype']}, "
                 f"{report['environment']['device']}, {report['environment']['threads']} threads)", fontsize=10)
    return save_figure(fig, path, dpi=120)


def summary_line(report: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The one-line JSON a caller (or CI) reads from the last stdout line."""
    by_len = {e["seq_len"]: e["speedup"] for e in report["results"]}

    def pick(key: str) -> dict[int, float | None]:
        return {n: (round(s[key], 4) if s.get(key) is not None else None) for n, s in by_len.items()}

    return {
        "run_dir": str(run_dir),
        "model": report["model"],
        "pruning": report["pruning"].get("name"),
        "predictor": report["pruning"].get("predictor"),
        "dtype": report["environment"]["dtype"],
        "prefill_speedup": pick("prefill"),
        "analytic_prefill_ratio": pick("analytic_prefill"),
        "prefill_vs_analytic": pick("prefill_vs_analytic"),
        "decode_speedup": pick("decode"),
        "end_to_end_speedup": pick("end_to_end"),
        "kv_cache_reduction": pick("kv_cache_reduction"),
        "targets_met": report.get("targets", {}).get("all_met"),
    }
