"""Tokens-per-layer shares of pruning schedules, for the pages that compare at equal KV memory or tokens per layer
(called by the shell functions of experiments/lib/kv_pages.sh). The printed values enter the cells' fingerprints:
keep their formats.

    python experiments/lib/schedule_shares.py shares MODEL KEEP...        # default share, kv.ratio per KEEP, per layer
    python experiments/lib/schedule_shares.py equal-keep MODEL LAYOUT...  # per-stage keep ratio of each layout
"""

from __future__ import annotations

import sys

from sdtp.config import build_schedule, compose

LENGTH = 1_000_000  # prompt tokens: long enough that budgets do not round


def per_layer(model: str, *overrides: str) -> list[float]:
    """The share of the prompt each decoder layer processes under ``model``'s schedule with ``overrides``."""
    cfg = compose("eval", [f"model={model}", "pruning=random", *overrides])
    return [tokens / LENGTH for tokens in build_schedule(cfg).tokens_per_layer(LENGTH, int(cfg.model.num_layers))]


def share(model: str, *overrides: str) -> float:
    """The mean of :func:`per_layer`: tokens per layer as a share of the prompt."""
    layers = per_layer(model, *overrides)
    return sum(layers) / len(layers)


def shares(model: str, keeps: list[str]) -> None:
    """Line 1: the default schedule's share (2 decimals), then for each milder per-stage keep 0.KEEP the kv.ratio
    (share / that schedule's share, 3 decimals) that brings it to the same KV memory. Line 2: the default's share
    per layer, a list (4 significant digits: kv.layer_ratios)."""
    default = share(model)
    print(f"{default:.2f}", *(f"{default / share(model, f'pruning.keep_ratio=0.{keep}'):.3f}" for keep in keeps))
    print("[" + ",".join(f"{r:.4g}" for r in per_layer(model)) + "]")


def equal_keep(model: str, layouts: list[str]) -> None:
    """One line per layout (stage layers, comma-separated): the per-stage keep ratio (4 decimals) at which it gives
    each layer, on average, the default schedule's share of tokens (bisection: the share grows with the ratio)."""
    target = share(model)
    for layout in layouts:
        low, high = 0.0, 1.0
        for _ in range(30):
            r = (low + high) / 2
            low, high = (r, high) if share(model, f"pruning.layers=[{layout}]", f"pruning.keep_ratio={r}") < target \
                else (low, r)
        print(f"{(low + high) / 2:.4f}")


if __name__ == "__main__":
    mode, model, *args = sys.argv[1:]
    {"shares": shares, "equal-keep": equal_keep}[mode](model, args)
