"""docs/extending.md: its code blocks (a user's scorer, its config, a Python session) work as written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdtp.config import REPO_ROOT, build_pruner, compose
from sdtp.models.loading import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

DOC = REPO_ROOT / "docs" / "extending.md"
# A fenced block whose first line is a comment naming a file, e.g. ```python\n# my_scorers/similarity.py\n...```
_FILE_BLOCK = re.compile(r"```(?:python|yaml)\n# ([\w/.]+\.(?:py|yaml))\n(.*?)```", re.S)
PROMPT = "a prompt that is long enough to prune " * 3


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The page's files written into a fresh project folder, as a user would, and put on sys.path."""
    files = dict(_FILE_BLOCK.findall(DOC.read_text()))
    assert {"my_scorers/similarity.py", "conf/pruning/similarity.yaml", "try_similarity.py"} <= set(files)
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n{body}")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_scorers", "my_scorers.similarity"):  # another test's project may have imported them
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def _overrides(project: Path) -> list[str]:
    return ["model=tiny-llama", "pruning=similarity", f"hydra.searchpath=[file://{project}/conf]"]


def _run(project: Path, args: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(project), str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=project, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@torch.no_grad()
def test_documented_scorer_keeps_the_tokens_most_similar_to_the_newest(project):
    cfg = compose("generate", _overrides(project))
    model, tokenizer = load_model(cfg.model)
    pruner = build_pruner(cfg)
    assert type(pruner.scorer).__module__ == "my_scorers.similarity"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with pruner(model):
        model(ids, use_cache=True)
    # Stage 0 sees the dense hidden states entering its layer: rank them by hand.
    schedule, layer, n = pruner.schedule, pruner.schedule.layers[0], ids.shape[1]
    hidden = model(ids, output_hidden_states=True).hidden_states[layer][0].float()
    similarity = torch.cosine_similarity(hidden, hidden[-1:], dim=-1)
    positions = torch.arange(n)
    protected = (positions < schedule.keep_first) | (positions >= n - schedule.num_recent(n))
    free = positions[~protected]
    best = free[similarity[free].argsort(descending=True)[: schedule.budget(0, n) - int(protected.sum())]]
    expected = torch.cat([positions[protected], best]).sort().values
    assert pruner.last_prefill.layer_positions[layer][0].tolist() == expected.tolist()


def test_cli_command_of_the_page_runs_the_scorer(project):
    proc = _run(project, ["-m", "sdtp.cli.generate", *_overrides(project), f"prompt={PROMPT}",
                          "max_new_tokens=4", "threads=1", f"hydra.run.dir={project}/run"])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    schedule = build_pruner(compose("generate", _overrides(project))).schedule
    n = out["prompt_tokens"]
    assert out["pruning"] == "similarity"
    assert out["kept_per_stage"] == [schedule.budget(stage, n) for stage in range(len(schedule.layers))]
    assert "Instantiating scorer <my_scorers.similarity.LastTokenSimilarityScorer>" in proc.stderr


def test_python_session_of_the_page_runs(project):
    lines = _run(project, ["try_similarity.py"]).stdout.strip().splitlines()
    layers = compose("generate", _overrides(project)).model.schedule
    stage_layers = [layers.first_layer + i * layers.layer_step for i in range(layers.num_stages)]
    assert [int(line.split()[1]) for line in lines] == stage_layers
    # "layer L caches k of n tokens: [positions]"
    kept, total = [int(line.split()[3]) for line in lines], {int(line.split()[5]) for line in lines}
    assert kept == sorted(kept, reverse=True) and len(total) == 1 and kept[0] < total.pop()
    assert [len(json.loads(line.split(": ", 1)[1])) for line in lines] == kept


def test_report_command_of_the_page_pairs_the_scorer(project, tmp_path):
    """``predictor_report.py --scorer similarity=similarity --override hydra.searchpath=...`` (tiny data)."""
    from sdtp.reports import predictor_eval

    wiki = tmp_path / "wiki.raw"
    wiki.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 12)
    out = tmp_path / "report"
    report = predictor_eval.main([
        "--model", "tiny-llama", "--contexts", "48", "--cont-len", "8", "--num-segments", "3", "--random-seeds", "0",
        "--datasets", "wikitext", "--wikitext-file", str(wiki), "--predictor", f"sdtp={tmp_path / 'none'}",
        "--scorer", "similarity=similarity", "--override", f"hydra.searchpath=[file://{project}/conf]",
        "--only", "dense,norm,similarity", "--out", str(out)])
    rows = {r["scorer"]: r for r in report["cells"][0]["rows"]}
    assert {"dense", "norm", "similarity"} <= set(rows) and rows["similarity"]["layer_fraction"] < 1.0
    assert rows["similarity"]["nll"] != rows["norm"]["nll"]  # its own scores, not a built-in's
    assert "`similarity` `pruning=similarity`" in (out / "eval.md").read_text()
