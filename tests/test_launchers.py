"""Hydra launchers for sweeps: ``hydra/launcher=parallel`` (joblib, local), ``hydra/launcher=slurm`` (submitit, one
process per point) and ``hydra/launcher=slurm_node`` (one data-parallel GPU node per point).

Each launcher config composes with every CLI's primary config and validates offline; the Slurm one is
rendered into the sbatch script submitit would submit; a tiny joblib multirun runs for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sdtp.config import CONF_DIR, REPO_ROOT, validate_config

CLIS = ("train", "eval", "label", "pipeline")
LAUNCHERS = {
    "parallel": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "slurm_node": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def _launcher(cli: str, launcher: str, extra: tuple[str, ...] = ()) -> DictConfig:
    """The resolved ``hydra.launcher`` node of ``cli``'s config with ``launcher`` (the job's config validated too)."""
    overrides = [f"hydra/launcher={launcher}", "model=tiny-llama", *extra]
    cfg = _compose(cli, overrides)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate_config(job, overrides)
    # hydra.sweep.dir / hydra.job.name are filled by Hydra at launch time; set them as it does.
    cfg.hydra.job.name = cli
    cfg.hydra.sweep.dir = "/sweeps/x"
    node = cfg.hydra.launcher
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


@pytest.mark.parametrize("cli", CLIS)
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_composes_with_every_cli(cli: str, launcher: str):
    node = _launcher(cli, launcher)
    assert node._target_ == LAUNCHERS[launcher]
    # The launcher class accepts every field (construction does not submit or fork anything).
    instantiate(node)


@pytest.mark.parametrize("cli", CLIS)
def test_parallel_launcher_fields(cli: str):
    node = _launcher(cli, "parallel")
    assert node.n_jobs >= 1 and node.prefer == "processes"
    assert _launcher(cli, "parallel", ("hydra.launcher.n_jobs=8",)).n_jobs == 8


def _sbatch_script(node: DictConfig, folder: Path) -> str:
    """The sbatch file submitit writes for ``node``, keyed as hydra-submitit-launcher passes them."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = OmegaConf.to_container(node)
    params.pop("_target_")
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(folder), slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m sdtp.cli.train", "uid")


@pytest.mark.parametrize("cli", CLIS)
def test_slurm_launcher_renders_a_one_gpu_7b_job(cli: str, tmp_path, monkeypatch):
    import submitit

    node = _launcher(cli, "slurm", ("hydra.launcher.partition=gpu",))
    for key in ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "array_parallelism"):
        assert node[key] is not None and int(node[key]) >= 1, f"hydra.launcher.{key}"
    assert node.tasks_per_node == 1 and node.nodes == 1  # one process per job: no torchrun inside
    assert node.submitit_folder == "/sweeps/x/.submitit/%j"
    # No Slurm here: pretend srun exists so submitit builds its executor; nothing is submitted.
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    script = _sbatch_script(node, tmp_path)
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --mem=64GB",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --ntasks-per-node=1", f"#SBATCH --job-name={cli}"):
        assert line in script, line


def test_slurm_node_launcher_renders_one_rank_per_gpu(tmp_path, monkeypatch):
    """A whole node per sweep point: as many tasks (ranks, sdtp.distributed.adopt_submitit_tasks) as GPUs."""
    import submitit

    node = _launcher("train", "slurm_node", ("hydra.launcher.partition=gpu",))
    assert node.tasks_per_node == node.gpus_per_node == 8 and node.nodes == 1
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    script = _sbatch_script(node, tmp_path)
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --cpus-per-task=8"):
        assert line in script, line
    assert "srun" in script  # every task runs the point's job


def test_misspelt_slurm_field_is_refused(tmp_path, monkeypatch):
    import submitit

    with pytest.raises(Exception, match="gpus"):  # the plugin's schema is closed
        _launcher("train", "slurm", ("hydra.launcher.gpus=1",))
    # A field forced in with `+` gets past Hydra, but submitit refuses it before anything is submitted.
    node = _launcher("train", "slurm", ("+hydra.launcher.gpus=1",))
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    with pytest.raises(Exception, match="gpus"):
        _sbatch_script(node, tmp_path)


@pytest.mark.slow  # ~40 s on an idle 2-core box (two worker processes import torch), minutes on a loaded one
def test_parallel_multirun_runs_two_tiny_jobs(tmp_path):
    """``sdtp-train -m hydra/launcher=parallel`` with two seeds: both points train, each in its own worker."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "sdtp.cli.train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
           "model=tiny-llama", "data=c4", "data.sources.0.num_samples=8", "data.max_length=48",
           "data.continuation_length=12", "seed=0,1", "threads=1", "train.max_steps=2", "train.grad_accum=1",
           "train.val_sequences=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           f"out_dir={runs}/" + "seed${seed}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for seed in (0, 1):
        metrics = json.loads((runs / f"seed{seed}" / "metrics.json").read_text())
        assert metrics, seed
    # One Hydra job directory per point: seed is part of the sweep subdir's name.
    assert len(list((tmp_path / "sweep").rglob(".hydra/overrides.yaml"))) == 2


def test_a_sweep_checks_every_point_before_the_first_runs(tmp_path):
    """``-m pruning.keep_ratio=0.5,2.0``: the 2.0 point is refused before the 0.5 point runs (the validating
    sweeper, conf/hydra/sweeper/validating.yaml): no job directory is made."""
    cmd = [sys.executable, "-m", "sdtp.cli.evaluate", "-m", "eval=needle", "model=tiny-llama", "pruning=random",
           "pruning.keep_ratio=0.5,2.0", "eval.lengths=[512]", "eval.num_samples=1", f"hydra.sweep.dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "sweep job #1 (" in done.stderr and "pruning.keep_ratio: 2.0 is outside (0, 1]" in done.stderr
    assert not list(tmp_path.rglob(".hydra"))
    # ... and with the entry point's own checks (sdtp-eval's: a needle length beyond the model)
    cmd[cmd.index("eval.lengths=[512]")] = "eval.lengths=[512],[100000]"
    cmd[cmd.index("pruning.keep_ratio=0.5,2.0")] = "pruning.keep_ratio=0.5"
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "sweep job #1 (" in done.stderr and "100000" in done.stderr, done.stderr[-2000:]
    assert not list(tmp_path.rglob(".hydra"))
