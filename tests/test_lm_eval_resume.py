"""``eval=lm_eval``'s in-run checkpoint: a killed run resumes from lm-eval's request cache and the kept records,
and ends with the metrics of an uninterrupted run (tiny model, the first COPA documents)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lm_eval.tasks
import pytest
from lm_eval.tasks import TaskManager

from sdtp.cli.evaluate import run
from sdtp.config import compose
from sdtp.distributed import World
from sdtp.engine.pruner import PrefillRecord
from sdtp.errors import ConfigError
from sdtp.eval.harness import CACHE_PREFIX, KEPT_STATE, request_cache
from sdtp.eval.kept import KeptLedger
from sdtp.eval.lm_eval_model import SDTPLM

pytestmark = pytest.mark.usefixtures("single_thread")
DB = f"{CACHE_PREFIX}_rank0.db"


class Killed(KeyboardInterrupt):
    """What the patched scorer raises: a run interrupted part way (as Ctrl-C, not an error lm-eval may handle)."""


class OfflineTaskManager(TaskManager):
    """lm-eval's TaskManager without its thousands of built-in task YAMLs (a minute of indexing per run here)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "include_defaults": False})


@pytest.fixture(autouse=True)
def offline_tasks(monkeypatch):
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OfflineTaskManager)  # evaluate_lm imports it at call time


def _cfg(run_dir: Path, pruning: str, *extra: str):
    return compose("eval", ["eval=lm_eval", "model=tiny-llama", f"pruning={pruning}", "eval.tasks=[sdtp_copa]",
                            "eval.limit=5", "eval.num_fewshot=1", "eval.batch_size=2", f"run_dir={run_dir}", *extra])


@pytest.fixture
def batches(monkeypatch):
    """Counts the scored batches (dense: HFLM's forwards; pruned: prefill + continuation batches) and raises
    ``Killed`` at batch ``kill_at`` (1-based; None: never)."""
    state = SimpleNamespace(calls=0, kill_at=None)

    def counting(method):
        def wrapper(self, *args, **kwargs):
            state.calls += 1
            if state.kill_at is not None and state.calls >= state.kill_at:
                raise Killed
            return method(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(SDTPLM, "_model_call", counting(SDTPLM._model_call))  # the dense path's batch forward
    monkeypatch.setattr(SDTPLM, "_score_batch", counting(SDTPLM._score_batch))  # the pruned path's batch
    return state


def _samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples_sdtp_copa.jsonl").read_text().splitlines()]


def _summary(metrics: dict) -> dict:
    """What a resumed run must reproduce: task metrics, document count and the kept fractions."""
    keep = ("tasks", "n_samples", "avg_kept_fraction", "avg_layer_token_fraction", "avg_pruned_prompt_tokens",
            "pruned_prefills")
    return {key: metrics["results"].get(key) for key in keep} | {"avg_kept_fraction": metrics["avg_kept_fraction"]}


@pytest.mark.parametrize("pruning", ["none", "norm"])
def test_killed_run_resumes_with_the_metrics_of_an_uninterrupted_one(tmp_path, batches, pruning):
    whole = run(_cfg(tmp_path / "whole", pruning))
    total = batches.calls
    assert total >= 3
    assert not any((tmp_path / "whole" / name).exists() for name in (DB, KEPT_STATE))  # deleted once finished

    batches.calls, batches.kill_at = 0, 3  # two batches scored, killed in the third
    with pytest.raises(Killed):
        run(_cfg(tmp_path / "resumed", pruning))
    assert (tmp_path / "resumed" / DB).is_file()
    assert (tmp_path / "resumed" / KEPT_STATE).is_file() == (pruning != "none")  # dense prefills keep everything

    batches.calls, batches.kill_at = 0, None
    resumed = run(_cfg(tmp_path / "resumed", pruning))
    assert batches.calls == total - 2  # only what the killed run had not scored
    assert resumed["resumed"] is True and "resumed" not in whole
    assert _summary(resumed) == _summary(whole)
    if pruning != "none":
        assert 0 < resumed["avg_kept_fraction"] < 1 and resumed["results"]["pruned_prefills"] == 5
    assert _samples(tmp_path / "resumed") == _samples(tmp_path / "whole")
    assert not any((tmp_path / "resumed" / name).exists() for name in (DB, KEPT_STATE))


def test_another_setup_deletes_the_checkpoint_instead_of_reusing_it(tmp_path, batches, caplog):
    """The cache is keyed by the requests' text only: norm's answers must not be reused for positional pruning."""
    batches.kill_at = 3
    with pytest.raises(Killed):
        run(_cfg(tmp_path, "norm"))
    assert (tmp_path / DB).is_file() and (tmp_path / KEPT_STATE).is_file()

    batches.calls, batches.kill_at = 0, None
    with caplog.at_level(logging.WARNING, logger="sdtp.cli.evaluate"):
        metrics = run(_cfg(tmp_path, "positional"))
    assert DB in caplog.text and KEPT_STATE in caplog.text and "another setup" in caplog.text
    assert "resumed" not in metrics
    assert batches.calls == 3  # every one of the 5 contexts prefilled again, in batches of 2
    assert metrics["results"]["pruned_prefills"] == 5


def test_checkpoint_false_keeps_nothing_and_restarts(tmp_path, batches):
    batches.kill_at = 3
    with pytest.raises(Killed):
        run(_cfg(tmp_path, "norm", "eval.checkpoint=false"))
    assert not (tmp_path / DB).exists() and not (tmp_path / KEPT_STATE).exists()

    batches.calls, batches.kill_at = 0, None
    metrics = run(_cfg(tmp_path, "norm", "eval.checkpoint=false"))
    assert batches.calls == 3 and "resumed" not in metrics
    assert not any(path.name.startswith(CACHE_PREFIX) for path in tmp_path.iterdir())
    # How the run was executed, not what it computed: the finished run is reused with the checkpoint on.
    (tmp_path / "metrics.json").write_text(json.dumps(dict(metrics, marker=1)))
    assert run(_cfg(tmp_path, "norm"))["marker"] == 1


def test_checkpoint_key_is_validated_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="eval.checkpoint: must be true or false"):
        run(_cfg(tmp_path, "none", "eval.checkpoint=sometimes"))


def test_data_parallel_runs_keep_no_checkpoint(tmp_path, caplog):
    """Each rank would cache its own share, and resumed ranks would then shard different request lists."""
    cfg = _cfg(tmp_path, "norm")
    ranks = [SimpleNamespace(world=World(rank=rank, size=2), keep_records_in=pytest.fail) for rank in (0, 1)]
    with caplog.at_level(logging.INFO, logger="sdtp.eval.harness"):
        assert [request_cache(cfg, lm, tmp_path) for lm in ranks] == [None, None]
    assert caplog.text.count("single-process only") == 1  # rank 0 says it once


def _record(seq_len: int, kept: int) -> PrefillRecord:
    return PrefillRecord(seq_len=seq_len, kept_per_stage=[kept], tokens_per_layer=[seq_len, kept])


def test_kept_ledger_counts_a_reprefilled_context_once(tmp_path):
    path = tmp_path / KEPT_STATE
    first = KeptLedger(path)
    first.add(KeptLedger.key("loglikelihood", [1, 2, 3]), _record(10, 5))
    first.add(KeptLedger.key("loglikelihood", [4, 5]), _record(20, 10))
    first.add(KeptLedger.key("generate_until", [6], 9, ["\n"]), None)  # dense: not recorded
    first.save()
    # Resumed: the second context's answers were lost, so it is prefilled again; a repeated generation request
    # (one cache entry) is prefilled twice in the same session and counts twice, as in an uninterrupted run.
    second = KeptLedger(path)
    second.add(KeptLedger.key("loglikelihood", [4, 5]), _record(20, 10))
    second.add(KeptLedger.key("generate_until", [7], 9, ["\n"]), _record(30, 30))
    second.add(KeptLedger.key("generate_until", [7], 9, ["\n"]), _record(30, 30))
    second.save()
    stats = KeptLedger(path).stats()
    assert stats.prompt_tokens == [10, 20, 30, 30] and stats.final == [0.5, 0.5, 1.0, 1.0]
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable kept-fraction checkpoint"):
        KeptLedger(path)
