"""W&B logging: a resumed run reuses the saved run id; runs are tagged with their overrides."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sdtp.tracking import RUN_ID_FILE, RunLogger, wandb_tags


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module recording every ``init`` call (no process, no network)."""
    calls = []

    class Run:
        summary: dict = {}

        def log(self, metrics, step=None):
            pass

        def finish(self):
            pass

    module = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_resume_continues_the_same_wandb_run(tmp_path, fake_wandb):
    cfg = {"backend": "wandb", "project": "p", "mode": "offline", "group": "ablation", "tags": ["t"]}
    with RunLogger(tmp_path, cfg, name="run") as logger:
        logger.log({"loss": 1.0}, step=1)
    first = fake_wandb[0]
    assert first["resume"] is None and first["group"] == "ablation" and first["tags"] == ["t"]
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first["id"]
    with RunLogger(tmp_path, cfg, name="run", resume=True):
        pass
    assert fake_wandb[1]["id"] == first["id"] and fake_wandb[1]["resume"] == "allow"
    with RunLogger(tmp_path, cfg, name="run"):  # a fresh (non-resumed) run in the same folder: a new run
        pass
    assert fake_wandb[2]["id"] != first["id"] and fake_wandb[2]["resume"] is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 1.0



def test_long_overrides_become_tags_wandb_accepts():
    """A path override is longer than W&B's 64-character tag limit, which fails the run after the model loads."""
    from wandb import Settings

    long_a, long_b = "out_dir=/scratch/" + "a" * 80, "out_dir=/scratch/" + "a" * 79 + "b"
    with pytest.raises(ValueError, match="Tags must be between 1 and 64 characters"):
        Settings(run_tags=[long_a])
    tags = wandb_tags(["t", "", long_a, long_b, *[f"k{i}=1" for i in range(70)]])
    Settings(run_tags=tags)  # accepted
    assert len(tags) == 64 and tags[:2] == ["t", long_a[:55] + tags[1][55:]]
    assert len(tags[1]) == 64 and tags[1] != tags[2]  # long tags that share their start stay apart
