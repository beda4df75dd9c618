"""Run provenance: fingerprints decide reuse, force=true really recomputes, one writer per run directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from sdtp.cli.evaluate import run
from sdtp.config import compose
from sdtp.paths import ABS_PATH
from sdtp.provenance import LOCK_FILE, RunLockedError, differences, fingerprint, locations_portable, portable, run_lock
from sdtp.utils import atomic_path, write_json_atomic

pytestmark = pytest.mark.usefixtures("single_thread")


def _records(path, n=2):
    rows = [{"input": "", "context": f"Passage {i}: " + "news text. " * 40, "answers": ["a summary of news"],
             "length": 90, "all_classes": None, "_id": f"id{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _longbench(tmp_path, *extra):
    return compose("eval", ["eval=longbench", "model=tiny-llama", "pruning=random", f"eval.data_dir={tmp_path}",
                            "eval.max_length=200", "eval.max_new_tokens=3", f"run_dir={tmp_path / 'run'}", *extra])


def _tamper(run_dir):
    """Overwrite every prediction's text and score by hand, as the issue's reviewer did."""
    path = run_dir / "predictions.jsonl"
    rows = [dict(json.loads(line), pred="tampered", score=1.0) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_force_recomputes_tampered_predictions(tmp_path):
    _records(tmp_path / "multi_news.jsonl")
    first = run(_longbench(tmp_path))
    assert first["results"]["datasets"]["multi_news"] < 100
    _tamper(tmp_path / "run")
    forced = run(_longbench(tmp_path, "force=true"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["pred"] != "tampered" for r in rows) and len(rows) == 2
    assert forced["results"]["datasets"] == first["results"]["datasets"]


def test_partial_outputs_of_another_setup_are_not_resumed(tmp_path):
    """A killed run (predictions, no metrics) resumes only under the same fingerprint."""
    _records(tmp_path / "multi_news.jsonl")
    first = run(_longbench(tmp_path))
    (tmp_path / "run" / "metrics.json").unlink()
    _tamper(tmp_path / "run")
    # Same setup: the partial predictions are resumed (that is what resuming means) ...
    assert run(_longbench(tmp_path))["results"]["datasets"]["multi_news"] == 100.0
    # ... but a changed data file makes them stale: deleted, recomputed.
    (tmp_path / "run" / "metrics.json").unlink()
    _tamper(tmp_path / "run")
    text = (tmp_path / "multi_news.jsonl").read_text()
    (tmp_path / "multi_news.jsonl").write_text(text.replace("news text.", "news text!"))
    again = run(_longbench(tmp_path))
    assert again["results"]["datasets"]["multi_news"] < 100
    assert again["fingerprint"]["data"] != first["fingerprint"]["data"]


def _continuation(tmp_path):
    text = tmp_path / "wiki.test.raw"
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 40)
    return compose("eval", ["eval=continuation", "model=tiny-llama", "pruning=norm", f"eval.data_file={text}",
                            "eval.context_len=96", "eval.cont_len=16", "eval.num_segments=3",
                            f"run_dir={tmp_path / 'run'}"])


def test_continuation_segments_of_another_setup_are_not_resumed(tmp_path):
    """segments.jsonl hashes the segments, model and pruning config only; what else the fingerprint holds (here a
    package version; a predictor file's contents, the resolved dtype) must clear it too."""
    run_dir = tmp_path / "run"
    first = run(_continuation(tmp_path))
    assert "resumed" not in first

    def interrupt() -> None:  # a killed run: no metrics.json, its segments (tampered, to see reuse) left behind
        (run_dir / "metrics.json").unlink()
        path = run_dir / "segments.jsonl"
        path.write_text("".join(json.dumps(dict(json.loads(line), nll=9.0)) + "\n"
                                for line in path.read_text().splitlines()))

    interrupt()
    resumed = run(_continuation(tmp_path))  # same setup: continued, and marked
    assert resumed["results"]["nll"] == pytest.approx(9.0) and resumed["resumed"] is True
    interrupt()
    started = json.loads((run_dir / "fingerprint.json").read_text())
    write_json_atomic(run_dir / "fingerprint.json", {**started, "packages": {**started["packages"], "torch": "0.0"}})
    again = run(_continuation(tmp_path))
    assert again["results"]["nll"] == pytest.approx(first["results"]["nll"]) and "resumed" not in again


def test_changed_default_or_predictor_invalidates_a_finished_run(tmp_path):
    _records(tmp_path / "multi_news.jsonl")
    run(_longbench(tmp_path))
    marker = tmp_path / "run" / "metrics.json"
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), marker=1)))
    assert run(_longbench(tmp_path)).get("marker") == 1  # same fingerprint: reused
    # A different value of a key the command line never names (a config default changing) recomputes.
    cfg = _longbench(tmp_path)
    cfg.eval.chat_template = "false"
    assert "marker" not in run(cfg)


def test_fingerprint_contents_and_differences(tmp_path):
    weights = tmp_path / "ckpt"
    weights.mkdir()
    (weights / "predictor.safetensors").write_bytes(b"\x00" * 8)
    (weights / "predictor.json").write_text("{}")
    (weights / "README.md").write_text("notes")  # documentation beside the weights is not hashed
    cfg = compose("eval", ["eval=perplexity", "model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={weights}"])
    data = tmp_path / "wiki.raw"
    data.write_text("text")
    fp = fingerprint(cfg, [data])
    # Stored portable (sdtp/paths.py): a checkpoint outside the repo, data dir and home is named by file only.
    assert set(fp["predictor"]) == {"<abs>/predictor.safetensors", "<abs>/predictor.json"}
    assert fp["dtype"] == "torch.float32" and fp["device"] == "cpu"
    assert set(fp["packages"]) >= {"torch", "transformers", "lm_eval"} and fp["packages"]["torch"]
    assert "force" not in fp["config"] and fp["config"]["eval"]["window"] == 2048
    assert {"commit", "dirty"} == set(fp["git"])
    assert differences(fp, fp) == [] and differences(None, fp) == ["fingerprint (none stored)"]
    (weights / "predictor.safetensors").write_bytes(b"\x01" * 8)
    changed = differences(fp, fingerprint(cfg, [data]))
    assert changed == ["predictor.<abs>/predictor.safetensors"]
    # The git commit is recorded but not compared (see sdtp/provenance.py).
    assert differences(dict(fp, git={"commit": "0" * 40, "dirty": True}), fp) == []


def test_portable_fingerprint_ignores_the_clone_location_only():
    """The same run in another clone: equal once locations are factored out; other contents still differ."""
    def fp(root, digest="d1", dtype="torch.bfloat16"):
        return {"config": {"paths": {"root": root, "data_dir": f"{root}/../shared/data"},
                           "eval": {"include_path": f"{root}/sdtp/eval/tasks", "limit": 5},
                           "pruning": {"scorer": {"path": f"{root}/results/predictors/m"}}},
                "dtype": dtype, "device": "cpu", "packages": {"lm_eval": "0.4.13"},
                "data": {f"{root}/../shared/data/mc/copa.jsonl": digest, f"{root}/sdtp/eval/tasks/sdtp_copa.yaml": "y"},
                "predictor": {f"{root}/results/predictors/m/predictor.safetensors": "p"}, "git": {"commit": root}}

    here, there = portable(fp("/work/a")), portable(fp("/home/u/clone"))
    assert here == there and "git" not in here
    assert here["data"] == {"${paths.data_dir}/mc/copa.jsonl": "d1", "sdtp/eval/tasks/sdtp_copa.yaml": "y"}
    assert portable(fp("/work/a", digest="d2")) != here and portable(fp("/work/a", dtype="torch.float32")) != here


def _clone_fingerprint(root: str, data_dir: str, copa: str = "d1") -> dict:
    """A run's fingerprint as it was stored before paths were portable: absolute, in a clone at ``root``."""
    return {"config": {"paths": {"root": root, "data_dir": data_dir, "cache_dir": "/root/.cache/sdtp"},
                       "eval": {"data_root": f"{data_dir}/mc", "include_path": f"{root}/sdtp/eval/tasks"},
                       "pruning": {"scorer": {"path": f"{root}/results/predictors/m"}}},
            "dtype": "torch.bfloat16", "device": "cpu", "packages": {"lm_eval": "0.4.13"},
            "data": {f"{data_dir}/mc/copa.jsonl": copa, f"{root}/sdtp/eval/tasks/sdtp_copa.yaml": "y"},
            "predictor": {f"{root}/results/predictors/m/predictor.safetensors": "p",
                          f"{root}/results/predictors/m/predictor.json": "j",
                          # hashed before only the checkpoint files were (a report beside the weights)
                          f"{root}/results/predictors/m/multi_news.json": "report"},
            "git": {"commit": "c0ffee"}}


def test_committed_fingerprint_is_reused_in_a_fresh_clone_with_the_same_data():
    """(a) A fingerprint made here before paths were portable (absolute, worktree /work/wt_t3, data beside it),
    then migrated by scripts/portable_paths.py and committed, still matches the run a fresh clone elsewhere makes."""
    from sdtp.reports.portable_results import migrate_text

    made_here = _clone_fingerprint("/work/wt_t3", "/work/wt_t3/../shared/data")
    committed = json.loads(migrate_text(json.dumps(made_here)))
    assert not ABS_PATH.search(json.dumps(committed))
    elsewhere = locations_portable(dict(_clone_fingerprint("/ci/build/sdtp", "/ci/build/shared/data"),
                                        predictor={"/ci/build/sdtp/results/predictors/m/predictor.safetensors": "p",
                                                   "/ci/build/sdtp/results/predictors/m/predictor.json": "j"}))
    assert differences(made_here, elsewhere) == [] and differences(committed, elsewhere) == []
    assert portable(committed) == portable(made_here) == portable(elsewhere)


def test_different_data_or_predictor_is_detected_whatever_the_paths():
    """(b) The sha256 stays the identity: the same portable paths with other contents differ."""
    committed = locations_portable(_clone_fingerprint("/work/main", "/work/shared/data"))
    other_data = _clone_fingerprint("/ci/sdtp", "/mnt/mirror", copa="d2")  # data dir moved (SDTP_DATA_DIR)
    assert differences(committed, other_data) == ["data.${paths.data_dir}/mc/copa.jsonl"]
    other_weights = _clone_fingerprint("/ci/sdtp", "/mnt/mirror")
    other_weights["predictor"] = {**other_weights["predictor"], "/ci/sdtp/results/predictors/m/predictor.json": "j2"}
    assert differences(committed, other_weights) == ["predictor.results/predictors/m/predictor.json"]


def test_fingerprint_is_stored_portable(tmp_path):
    data_dir = tmp_path / "mirror"
    (data_dir / "lm").mkdir(parents=True)
    (data_dir / "lm" / "wiki.raw").write_text("text")
    cfg = compose("eval", ["eval=perplexity", "model=tiny-llama", f"paths.data_dir={data_dir}",
                           "eval.data_file=${paths.data_dir}/lm/wiki.raw"])
    fp = fingerprint(cfg, [data_dir / "lm" / "wiki.raw"])
    assert list(fp["data"]) == ["${paths.data_dir}/lm/wiki.raw"]
    assert fp["config"]["eval"]["data_file"] == "${paths.data_dir}/lm/wiki.raw" and fp["config"]["paths"]["root"] == "."
    assert not ABS_PATH.search(json.dumps(fp)), "an absolute path is left in the stored fingerprint"
    assert locations_portable(fp) == fp  # idempotent


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLockedError, match=f"{LOCK_FILE}.*delete"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    # A lock left by a process that no longer exists on this host is taken over.
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_locked_run_dir_refuses_before_any_work(tmp_path):
    _records(tmp_path / "multi_news.jsonl")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    with pytest.raises(RunLockedError, match="in use by pid"):
        run(_longbench(tmp_path))
    assert not (tmp_path / "run" / "predictions.jsonl").exists()


def test_results_are_world_readable_and_nan_free(tmp_path):
    path = write_json_atomic(tmp_path / "m.json", {"avg": float("nan"), "rows": [1.0, float("inf")]})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert json.loads(path.read_text()) == {"avg": None, "rows": [1.0, None]}


def test_atomic_path_replaces_only_on_success(tmp_path):
    """A writer that fails halfway leaves the old file and no temporary; one that succeeds replaces it, readable."""
    target = tmp_path / "sub" / "plot.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.suffix == ".png"  # matplotlib's format
        tmp.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["plot.png"]
    with atomic_path(target) as tmp:
        torch.save({"x": torch.ones(2)}, tmp)
    assert torch.load(target, weights_only=True)["x"].tolist() == [1.0, 1.0]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()


def test_save_figure_is_atomic_and_always_frees_the_figure(tmp_path):
    """A page's plot: PNG from the suffix; a failed save keeps the old file, leaves no temporary, closes the figure."""
    import matplotlib.pyplot as plt

    from sdtp.figures import new_figure, save_figure

    target = tmp_path / "page.png"
    fig, ax = new_figure(1, 1, figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, target, dpi=50) == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
    old = target.read_bytes()
    fig, ax = new_figure(1, 1)

    def disk_full(path, **options):
        Path(path).write_bytes(b"half a PNG")
        raise OSError("no space left on device")

    fig.savefig = disk_full
    with pytest.raises(OSError):
        save_figure(fig, target)
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["page.png"]
    assert not plt.fignum_exists(fig.number)


def test_prediction_log_drops_a_torn_line_and_resumes(tmp_path):
    """A run killed mid-line: reopening keeps the finished samples (rewritten atomically) and appends after them."""
    from sdtp.eval.predict import PredictionLog

    path = tmp_path / "predictions.jsonl"
    finished = [{"id": "a", "pred": "é"}, {"id": "b", "pred": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in finished) + '{"id": "c", "pr', encoding="utf-8")
    log = PredictionLog(path)
    assert "a" in log and "b" in log and "c" not in log
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.jsonl"]
    log.add({"id": "c", "pred": "y"})
    assert [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()] == ["a", "b", "c"]
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["pred"] == "é"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_outputs_under_results_do_not_make_the_tree_dirty(tmp_path):
    """An experiment's own summaries (results/) between its runs keep the commit clean; code changes do not."""
    from sdtp.utils import git_commit

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "page.md").write_text("old\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "results" / "page.md").write_text("new\n")
    (tmp_path / "results" / "point.json").write_text("{}")
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "new_module.py").write_text("")
    assert git_commit(tmp_path).endswith("-dirty")
