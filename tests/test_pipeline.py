"""sdtp-pipeline's stage configs: paths passed to the stages compose whatever their text (a sweep job's directory is
named by its overrides, e.g. ``seed=0``), without loading a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from sdtp.cli import evaluate, pipeline
from sdtp.cli.check import main as check
from sdtp.config import REPO_ROOT, build_schedule, compose, quoted_override
from sdtp.errors import ConfigError
from sdtp.training.demo import DEMO_OVERRIDES


@pytest.mark.parametrize("text", ["/runs/seed=0", "/runs/it's here", "a,b [c] {d}", "/runs/${oops}", "/runs/a\\b",
                                  "/runs/end\\", "/runs/q\\'x", "/runs/\\${x}"])
def test_quoted_override_reads_back_the_text(text):
    assert compose("eval", ["model=tiny-llama", quoted_override("run_dir", text)]).run_dir == text


def test_stage_paths_in_a_sweep_job_directory_compose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``sdtp-pipeline -m ... seed=0``: the eval stage composed ``run_dir=<...>/seed=0/eval/...`` unquoted, and
    Hydra's override parser refused the '=' after the generate stage had run; the retrained predictor's path and the
    training folders went the same way."""
    run_dir = tmp_path / "multirun" / "seed=0" / "it's ${here}"
    predictor = run_dir / "predictor"
    predictor.mkdir(parents=True)
    seen: list[tuple[str, Any]] = []

    def fake_eval(sub: DictConfig) -> dict[str, Any]:
        seen.append((sub.run_dir, (sub.pruning.get("scorer") or {}).get("path")))
        return {"results": {"perplexity": 1.0}, "wall_s": 0.0}

    monkeypatch.setattr(evaluate, "run", fake_eval)
    cfg = compose("pipeline", ["model=tiny-llama", "stages=[eval]", "variants=[none,sdtp]"])
    table = pipeline.eval_stage(cfg, run_dir, str(predictor))
    assert seen == [(str(run_dir / "eval" / name / variant), str(predictor) if variant == "sdtp" else None)
                    for name in cfg.evals for variant in ("none", "sdtp")]
    assert table["perplexity"]["sdtp"]["ppl"] == 1.0
    # the checks before the first stage compose the eval stage's run_dir (and the retraining's folders) as well
    pipeline.validate_pipeline(compose("pipeline", ["model=tiny-llama", "stages=[eval]", "variants=[none,random]",
                                                    "retrain_predictor=true"]), run_dir)
    train = compose("train", [*DEMO_OVERRIDES, *pipeline.retrain_overrides(cfg, run_dir)])
    assert (train.export_dir, train.out_dir) == (str(run_dir / "predictor"), str(run_dir / "train"))


def test_retraining_needs_no_shipped_predictor(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """``retrain_predictor=true`` trains the sdtp variant's predictor into <run_dir>/predictor before any stage: the
    checks refused a model without a shipped one (tiny-llama has none) by the shipped path."""
    run_dir = tmp_path / "seed=0"
    assert not (REPO_ROOT / "results" / "predictors" / "tiny-llama").exists()
    pipeline.validate_pipeline(compose("pipeline", ["model=tiny-llama", "retrain_predictor=true"]), run_dir)
    assert check(["pipeline", "model=tiny-llama", "retrain_predictor=true", "stages=[generate]"]) == 0
    with pytest.raises(ConfigError, match=r"pruning\.scorer\.path: .*results/predictors/tiny-llama does not exist"):
        pipeline.validate_pipeline(compose("pipeline", ["model=tiny-llama", "stages=[generate]"]), run_dir)


def test_retraining_gets_the_seed_threads_and_overrides_of_every_stage(tmp_path: Path):
    """``retrain_predictor=true`` trained with seed 0, torch's default threads and the default schedule whatever the
    pipeline's ``seed``, ``threads`` and ``overrides``; the sdtp variant then refused the predictor as trained for
    other stage layers."""
    cfg = compose("pipeline", ["model=tiny-llama", "seed=3", "threads=1", "retrain_predictor=true", "stages=[generate]",
                               "overrides=['pruning.layers=[1,3]','pruning.keep_ratio=[0.8,0.6]']"])
    train = compose("train", [*DEMO_OVERRIDES, *pipeline.retrain_overrides(cfg, tmp_path)])
    generate = compose("generate", pipeline.stage_overrides(cfg, "sdtp", str(tmp_path / "predictor")),
                       present=(str(tmp_path / "predictor"),))
    assert (train.seed, train.threads) == (3, 1)
    assert build_schedule(train) == build_schedule(generate)  # the schedule the predictor is trained for is used
    assert list(build_schedule(train).layers) == [1, 3]
    pipeline.validate_pipeline(cfg, tmp_path)
