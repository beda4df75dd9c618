"""W&B logging: a resumed run reuses the saved run id; runs are tagged with their overrides."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sdtp.tracking import RUN_ID_FILE, RunLogger


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

