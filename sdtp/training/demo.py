"""Label a small sample and train predictors on it: the learning stages of ``make demo``.

    from sdtp.training.demo import label_and_train
    summary = label_and_train(["model=smollm2-135m", "threads=1"])

Works inside a running Hydra app (e.g. ``sdtp-pipeline``) or standalone. The defaults are sized
to finish in a few minutes on a CPU; any ``sdtp-label``/``sdtp-train`` override can be appended.
"""

from __future__ import annotations

from typing import Any

from sdtp.config import compose

DEMO_OVERRIDES = [
    "data=dolly_c4",
    "data.sources.0.num_samples=24",
    "data.sources.1.num_samples=12",
    "data.max_length=128",
    "train.val_sequences=6",
    "train.max_steps=30",
    "train.ckpt_every=10",
    "experiment_name=demo",
]


def label_and_train(overrides: list[str] | None = None, label_dir: str | None = None) -> dict[str, Any]:
    """Run ``sdtp-label`` then ``sdtp-train`` with :data:`DEMO_OVERRIDES` + ``overrides``.

    Returns the training summary (``predictor`` = directory of the trained checkpoint, plus the
    held-out ``spearman``, ``topk_overlap``, ``ppl_pruned``, ``ppl_dense``).
    """
    from sdtp.cli import label, train

    overrides = DEMO_OVERRIDES + list(overrides or [])
    label_overrides = [o for o in overrides if not o.startswith(("train.", "experiment_name", "export_dir", "resume"))]
    if label_dir is not None:
        label_overrides.append(f"out_dir={label_dir}")
        overrides = overrides + [f"train.labels_dir={label_dir}"]
    label.run(compose("label", label_overrides))
    return train.run(compose("train", overrides))
