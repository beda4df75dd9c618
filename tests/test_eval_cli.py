"""`sdtp-eval`: composition, validation before loading, metrics.json, skip / force (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdtp.cli.evaluate import run
from sdtp.config import REPO_ROOT, compose
from sdtp.errors import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


def _perplexity_cfg(tmp_path, *overrides):
    return compose("eval", ["eval=perplexity", "model=tiny-llama", "eval.max_tokens=300", "eval.window=128",
                            "eval.stride=64", f"run_dir={tmp_path}", *overrides])


def test_eval_config_composes_with_each_runner():
    for name in ("lm_eval", "perplexity"):
        cfg = compose("eval", [f"eval={name}", "model=tiny-llama"])
        assert cfg.eval.name == name and cfg.eval.runner.startswith("sdtp.eval.")


def _hydra_dirs(config_name: str, overrides: list[str]) -> tuple[str, str]:
    """(run dir, sweep subdir) Hydra would give this command, resolved from its composed config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    return OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.sweep.subdir")


@pytest.mark.parametrize(("config_name", "experiments"), [("eval", ("paper_table3", "paper_table6")),
                                                           ("bench", ("paper_table1_bench", "paper_table2"))])
def test_runs_of_two_experiments_get_their_own_directories(config_name, experiments):
    """Otherwise the second run deletes the first's results (another fingerprint in the same directory)."""
    first, second = (_hydra_dirs(config_name, [f"experiment={name}", "model=tiny-llama"]) for name in experiments)
    assert first[1] != second[1]  # sweep points
    if config_name == "eval":  # bench's single runs are named by their start time
        assert first[0] != second[0]


def test_metrics_json_then_skip_then_force(tmp_path, capsys):
    cfg = _perplexity_cfg(tmp_path, "pruning=random")
    metrics = run(cfg)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(metrics))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["model"] == "tiny-llama" and saved["eval"] == "perplexity"
    assert saved["pruning"]["schedule"]["layers"] == [1, 2, 3]
    assert 0 < saved["avg_kept_fraction"] < 1 and saved["results"]["perplexity"] > 1
    assert "git_commit" in saved and (tmp_path / "metrics.jsonl").is_file()
    # Second run: skipped (the file is returned untouched), unless force=true.
    (tmp_path / "metrics.json").write_text(json.dumps(dict(saved, marker=1)))
    assert run(cfg)["marker"] == 1
    assert "marker" not in run(_perplexity_cfg(tmp_path, "pruning=random", "force=true"))


def test_finished_run_of_the_old_perplexity_protocol_is_recomputed(tmp_path):
    cfg = _perplexity_cfg(tmp_path)
    run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    del saved["fingerprint"]["config"]["eval"]["protocol"]  # as written before protocol 2
    (tmp_path / "metrics.json").write_text(json.dumps(dict(saved, marker=1)))
    rerun = run(cfg)
    assert "marker" not in rerun and rerun["results"]["protocol"] == 2


def test_lm_eval_runner_end_to_end(tmp_path):
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", "pruning=random", "eval.tasks=[sdtp_copa]",
                           "eval.limit=3", "eval.num_fewshot=1", f"run_dir={tmp_path}"])
    metrics = run(cfg)
    assert set(metrics["results"]["tasks"]["sdtp_copa"]) >= {"acc"}
    assert metrics["results"]["n_samples"]["sdtp_copa"] == 3
    assert metrics["results"]["pruned_prefills"] == 3  # one pruned prefill per question, shared by its 2 choices
    assert len((tmp_path / "samples_sdtp_copa.jsonl").read_text().splitlines()) == 3


def test_lm_eval_per_task_limits(tmp_path):
    """``eval.limit={task: n}``: the first n documents of each task (all of a task with fewer)."""
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", "eval.tasks=[sdtp_copa,sdtp_cb]",
                           "eval.limit={sdtp_copa: 2, sdtp_cb: 500}", "eval.num_fewshot=0", f"run_dir={tmp_path}"])
    metrics = run(cfg)
    assert metrics["results"]["n_samples"] == {"sdtp_copa": 2, "sdtp_cb": 56}
    assert metrics["results"]["limit"] == {"sdtp_copa": 2, "sdtp_cb": 500}
    ids = [json.loads(line)["doc_id"] for line in (tmp_path / "samples_sdtp_copa.jsonl").read_text().splitlines()]
    assert ids == [0, 1]


@pytest.mark.parametrize("limit,message", [("{sdtp_piqa: 3}", "not among eval.tasks"),
                                           ("{sdtp_copa: 0}", "integers > 0"), ("-1", "must be a number > 0"),
                                           ("abc", "got .abc.")])
def test_bad_lm_eval_limit_fails_before_loading(tmp_path, limit, message):
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", "eval.tasks=[sdtp_copa]", f"eval.limit={limit}",
                           f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)


@pytest.mark.parametrize("override,key", [
    ("eval.stride=128", "eval.stride"),
    ("eval.data_file=/nonexistent/wiki.raw", "eval.data_file"),
    ("eval.runner=sdtp.eval.nothing.run", "eval.runner"),
])
def test_bad_perplexity_config_fails_before_loading(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        run(_perplexity_cfg(tmp_path, override))
    assert not (tmp_path / "metrics.json").exists()


def test_bad_lm_eval_data_root_is_a_config_error(tmp_path):
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", "eval.data_root=/nonexistent", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.data_root"):
        run(cfg)


def test_cli_subprocess_writes_run_dir(tmp_path):
    cmd = [sys.executable, "-m", "sdtp.cli.evaluate", "eval=perplexity", "model=tiny-qwen2", "eval.max_tokens=200",
           "eval.window=96", "eval.stride=48", "threads=1", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["results"]["scored_tokens"] == 200 - (96 - 48)  # only tokens after a full window - stride context
    assert last["results"]["min_context_tokens"] == 96 - 48
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / ".hydra" / "config.yaml").is_file()


def test_kv_compression_with_continuation_scoring_is_refused(tmp_path):
    """Runners whose scoring KV compression does not reach refuse kv=... (eval=lm_eval and eval=continuation
    apply it, see tests/test_eval_lm_harness.py and tests/test_eval_continuation.py)."""
    cfg = compose("eval", ["eval=perplexity", "model=tiny-llama", "kv=h2o", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="kv=h2o"):
        run(cfg)
    assert not (tmp_path / "metrics.json").exists()
