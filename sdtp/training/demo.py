"""Train predictors on a small sample: the learning stage of ``make demo retrain_predictor=true``.

    from sdtp.training.demo import train_small
    summary = train_small(["model=smollm2-135m", "threads=1"])

Saliency labels are computed online in each step (no labelling pass, nothing stored). Works inside
a running Hydra app (e.g. ``sdtp-pipeline``) or standalone. The defaults are sized to finish in a
few minutes on a CPU; any ``sdtp-train`` override can be appended.
"""

from __future__ import annotations

from typing import Any

from sdtp.config import compose

DEMO_OVERRIDES = [
    "data=mix",
    "data.sources.0.num_samples=24",
    "data.sources.1.num_samples=12",
    "data.sources.2.num_samples=12",
    "data.max_length=320",
    "data.continuation_length=64",
    "train.val_sequences=6",
    "train.max_steps=30",
    "train.grad_accum=1",
    "train.ckpt_every=10",
    "train.loss.ce=0",
    "experiment_name=demo",
]


def train_small(overrides: list[str] | None = None) -> dict[str, Any]:
    """Run ``sdtp-train`` with :data:`DEMO_OVERRIDES` + ``overrides``.

    Returns the training summary (``predictor`` = directory of the trained checkpoint, plus the
    held-out ``nll_dense``, ``nll_random``, ``nll_sdtp``, ``spearman``).
    """
    from sdtp.cli import train

    return train.run(compose("train", DEMO_OVERRIDES + list(overrides or [])))
