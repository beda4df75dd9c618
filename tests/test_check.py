"""sdtp.cli.check: every command of a script composed and validated up front, and the scripts that call it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sdtp.cli.check import main
from sdtp.paths import REPO_ROOT


def check(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_passing_commands_exit_0_silently(capsys):
    code, err = check(capsys, "eval", "eval=needle", "pruning=random", "---", "bench", "pruning=none", "lengths=[512]")
    assert (code, err) == (0, "")


def test_composition_error_names_the_command(capsys):
    code, err = check(capsys, "eval", "eval=needle", "---", "eval", "experiment=paper_table1", "eval.limt=20")
    assert code == 1
    assert err.count("\n") == 1 and "sdtp-eval experiment=paper_table1 eval.limt=20:" in err and "'eval.limt'" in err
    code, err = check(capsys, "eval", "kv=h20")
    assert code == 1 and "Could not find 'kv/h20'" in err and "search path" not in err


def test_entry_validation_error(capsys):
    """The entry point's own check (validate_bench, validate_train_config), not only validate_config."""
    code, err = check(capsys, "eval", "eval=needle", "---", "bench", "lengths=[0]", "---", "train", "train.max_steps=0")
    assert code == 1 and err.startswith("check failed: sdtp-bench lengths=[0]: lengths:")
    code, err = check(capsys, "train", "train.max_steps=0")
    assert code == 1 and "train.max_steps" in err


def test_will_exist_covers_exactly_its_paths(capsys, tmp_path):
    later, other = tmp_path / "low", tmp_path / "other"
    command = ["eval", "eval=needle", "pruning=sdtp_low", f"pruning.scorer.path={later}"]
    code, err = check(capsys, *command)
    assert code == 1 and f"pruning.scorer.path: {later} does not exist" in err
    assert check(capsys, "--will-exist", str(later), *command) == (0, "")
    assert check(capsys, f"--will-exist={later}/", "bench", *command[2:], "untrained_predictor=never") == (0, "")
    code, err = check(capsys, "--will-exist", str(later), "eval", "eval=needle", "pruning=sdtp",
                      f"pruning.scorer.path={other}")
    assert code == 1 and f"{other} does not exist" in err


def test_usage_errors(capsys):
    assert check(capsys, "evaluate")[0] == 1
    assert check(capsys, "eval", "---")[0] == 1
    assert check(capsys, "--will-exist")[0] == 1


def run_script(tmp_path: Path, script: str, **env: str) -> subprocess.CompletedProcess:
    """Run an experiment script whose Python refuses to start a real step (the check must stop it first)."""
    guard = tmp_path / "python"
    guard.write_text(f'#!/usr/bin/env bash\ncase "$2" in sdtp.cli.train|sdtp.cli.evaluate|sdtp.cli.bench)\n'
                     f'  echo "reached $2" >&2; exit 42;;\nesac\nexec {sys.executable} "$@"\n')
    guard.chmod(0o755)
    env = {**os.environ, "PYTHON": str(guard), "BIN": str(tmp_path / "bin"), "RUN": str(tmp_path / "run"),
           "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_compare_methods_stops_at_a_bad_kv_policy(tmp_path):
    proc = run_script(tmp_path, "experiments/compare_methods.sh", KV_POLICIES="streaming,h20", STEPS="lm_eval kv")
    assert proc.returncode == 1, proc.stderr
    assert "check failed: sdtp-eval" in proc.stderr and "kv=h20" in proc.stderr and "[compare]" not in proc.stderr


def test_paper_table1_stops_at_bad_bench_args_before_training(tmp_path):
    proc = run_script(tmp_path, "experiments/paper_table1.sh", SMOKE="1", BENCH_ARGS="lengths=[512] repeat=1")
    assert proc.returncode == 1, proc.stderr
    assert "check failed: sdtp-bench" in proc.stderr and "'repeat'" in proc.stderr and "reached" not in proc.stderr
