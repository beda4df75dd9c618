"""Data-parallel ``sdtp-eval eval=lm_eval`` (sdtp/eval/lm_eval_model.py, sdtp/cli/evaluate.py): 2 CPU
processes on gloo, launched as on a GPU node (``accelerate launch --multi_gpu``), score every document
as one process does; rank 0 alone writes the run directory; other runners refuse several processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdtp.cli.evaluate import check_data_parallel, run, validate_eval
from sdtp.config import REPO_ROOT, compose
from sdtp.distributed import World, on_main, sharded_map
from sdtp.errors import ConfigError
from sdtp.eval.kept import KeptStats
from sdtp.provenance import LOCK_FILE, differences

pytestmark = pytest.mark.usefixtures("single_thread")

# A deterministic scorer (norm), so both runs keep the same tokens; batches of 2 contexts, whose
# composition differs between one process and each rank. 1-shot: lm-eval's own document sharding would
# give rank 1's documents other few-shot examples than one process does (sdtp/eval/lm_eval_model.py).
EVAL = ["eval=lm_eval", "model=tiny-llama", "pruning=norm", "eval.tasks=[sdtp_copa]", "eval.limit=5",
        "eval.num_fewshot=1", "eval.batch_size=2", "threads=1"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples_sdtp_copa.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(single-process run dir, 2-rank run dir, the 2-rank job's working directory)."""
    root = tmp_path_factory.mktemp("dp_eval")
    one, two, cwd = root / "one", root / "two", root / "cwd"
    cwd.mkdir()
    run(compose("eval", EVAL + [f"run_dir={one}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    # --multi_gpu is the launcher a GPU node uses (torchrun underneath); `--cpu` would start one process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
           "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}",
           "-m", "sdtp.cli.evaluate", *EVAL, "distributed.backend=gloo", f"hydra.run.dir={two}"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.strip().splitlines()) == 1  # rank 0 alone prints the JSON line
    return one, two, cwd


# One in-process run plus a 2-process launch, each paying lm-eval's task indexing: about 100 CPU-seconds,
# over a minute even on an idle 2-core box (5 min on a loaded one).
@pytest.mark.slow
def test_two_ranks_score_every_document_as_one_process(runs):
    one, two, _ = runs
    single, parallel = _samples(one), _samples(two)
    assert [s["doc_id"] for s in parallel] == [s["doc_id"] for s in single] == [0, 1, 2, 3, 4]
    for a, b in zip(single, parallel):
        assert (a["target"], a["acc"]) == (b["target"], b["acc"])
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["resps"], b["resps"]):
            assert ll_b == pytest.approx(ll_a, rel=1e-5, abs=1e-5) and greedy_a == greedy_b
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    r1, r2 = m1["results"], m2["results"]
    assert r2["tasks"] == r1["tasks"] and r2["n_samples"] == r1["n_samples"] == {"sdtp_copa": 5}
    # Every rank's pruned prefills are counted: one per document (its choices share it).
    assert r2["pruned_prefills"] == r1["pruned_prefills"] == 5
    for key in ("avg_kept_fraction", "avg_layer_token_fraction", "avg_pruned_prompt_tokens"):
        assert r2[key] == pytest.approx(r1[key]), key
    # Launching on several processes is not part of what a run computes: either run is reused as the other.
    assert differences(m1["fingerprint"], m2["fingerprint"]) == []


@pytest.mark.slow
def test_rank_zero_alone_writes(runs):
    _, two, cwd = runs
    assert list(cwd.iterdir()) == []  # rank 1's Hydra directory is ".": no .hydra/, log or outputs
    assert not (two / LOCK_FILE).exists()
    assert (two / "evaluate.log").read_text().count("(rank 0 of 2)") == 1
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 1


def test_other_runners_refuse_several_processes_before_loading(tmp_path):
    cfg = compose("eval", ["eval=perplexity", "model=tiny-llama", f"run_dir={tmp_path}"])
    validate_eval(cfg)
    with pytest.raises(ConfigError, match=r"eval=perplexity: runs in one process only, but WORLD_SIZE=2"):
        check_data_parallel(cfg, World(rank=1, size=2))
    check_data_parallel(cfg, World())
    check_data_parallel(compose("eval", EVAL + [f"run_dir={tmp_path}"]), World(rank=1, size=2))
    with pytest.raises(ConfigError, match="distributed.backend"):
        check_data_parallel(compose("eval", EVAL + ["distributed.backend=mpi", f"run_dir={tmp_path}"]), World())


def test_single_process_helpers():
    assert sharded_map(lambda items: [2 * i for i in items], [1, 2, 3], World()) == [2, 4, 6]
    assert on_main(lambda: 7, World()) == 7
    merged = KeptStats.merged([KeptStats([0.5], [0.75], [10]), KeptStats([1.0], [1.0], [30])])
    assert merged.summary()["avg_kept_fraction"] == pytest.approx((0.5 * 10 + 30) / 40)
