"""docs/extending.md: its code blocks (a user's token scorer and KV score, their configs, a Python session) work
as written."""

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
from sdtp.kv import KVCompressor, build_kv_policy
from sdtp.models.compat import output_cache
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
    assert {"my_scorers/similarity.py", "conf/pruning/similarity.yaml", "try_similarity.py", "my_kv/key_norm.py",
            "conf/kv/keynorm.yaml"} <= set(files)
    for rel, body in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n{body}")
    monkeypatch.syspath_prepend(str(tmp_path))
    # another test's project may have imported them
    for name in ("my_scorers", "my_scorers.similarity", "my_kv", "my_kv.key_norm"):
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


def _tiny_report(project: Path, tmp_path: Path, rows: list[str]) -> tuple[dict, Path]:
    """The page's report command on tiny WikiText-like data (3 segments of 48 + 8 tokens): (report, its folder)."""
    from sdtp.reports import predictor_eval

    wiki = tmp_path / "wiki.raw"
    wiki.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 12)
    out = tmp_path / "report"
    report = predictor_eval.main([
        "--model", "tiny-llama", "--contexts", "48", "--cont-len", "8", "--num-segments", "3", "--random-seeds", "0",
        "--datasets", "wikitext", "--wikitext-file", str(wiki), "--predictor", f"sdtp={tmp_path / 'none'}",
        "--override", f"hydra.searchpath=[file://{project}/conf]", *rows, "--out", str(out)])
    return report, out


def test_report_command_of_the_page_pairs_the_scorer(project, tmp_path):
    """``predictor_report.py --scorer similarity=similarity --override hydra.searchpath=...`` (tiny data)."""
    report, out = _tiny_report(project, tmp_path, ["--scorer", "similarity=similarity",
                                                   "--only", "dense,norm,similarity"])
    rows = {r["scorer"]: r for r in report["cells"][0]["rows"]}
    assert {"dense", "norm", "similarity"} <= set(rows) and rows["similarity"]["layer_fraction"] < 1.0
    assert rows["similarity"]["nll"] != rows["norm"]["nll"]  # its own scores, not a built-in's
    assert "`similarity` `pruning=similarity`" in (out / "eval.md").read_text()


def _kv_overrides(project: Path) -> list[str]:
    return ["model=tiny-llama", "kv=keynorm", f"hydra.searchpath=[file://{project}/conf]"]


@torch.no_grad()
def test_documented_kv_score_keeps_the_smallest_keys_per_head(project):
    """Every layer and KV head keeps its protected entries plus the entries with the smallest key norm, ranked
    here by hand from the uncompressed prefill's keys (the prompt repeats, so equal norms may tie: any kept
    unprotected entry's norm is at most any dropped one's)."""
    cfg = compose("generate", _kv_overrides(project))
    policy = build_kv_policy(cfg)
    assert policy.method == "keynorm" and type(policy.statistic).__module__ == "my_kv.key_norm"
    model, tokenizer = load_model(cfg.model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    n = ids.shape[1]
    dense = output_cache(model(ids, use_cache=True))
    with KVCompressor(policy)(model):
        cache = output_cache(model(ids, use_cache=True))
    protected, positions = policy.protected(n), torch.arange(n)
    for idx, layer in enumerate(dense.layers):
        norms = layer.keys.float().norm(dim=-1)[0]  # (H_kv, T)
        for head, norm in enumerate(norms):
            kept = cache.kept[idx][0, head]
            assert len(kept) == policy.budget(n) and set(positions[protected].tolist()) <= set(kept.tolist())
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[kept] = True
            assert norm[chosen & ~protected].max() <= norm[~chosen].min()


def test_cli_command_of_the_page_runs_the_kv_policy(project):
    args = ["-m", "sdtp.cli.generate", f"prompt={PROMPT}", "max_new_tokens=4", "threads=1"]
    compressed = json.loads(_run(project, [*args, *_kv_overrides(project), f"hydra.run.dir={project}/kv"])
                            .stdout.strip().splitlines()[-1])
    dense = json.loads(_run(project, [*args, "model=tiny-llama", f"hydra.run.dir={project}/dense"])
                       .stdout.strip().splitlines()[-1])
    assert (compressed["kv"], compressed["kv_ratio"]) == ("keynorm", 0.4)
    assert compressed["kv_cache_bytes"] < 0.6 * dense["kv_cache_bytes"]


def test_report_command_of_the_page_pairs_the_kv_policy(project, tmp_path):
    """``predictor_report.py --kv keynorm=keynorm --kv-ratio 0.63 --override hydra.searchpath=...`` (tiny data)."""
    report, out = _tiny_report(project, tmp_path, ["--kv", "keynorm=keynorm", "--kv-ratio", "0.63",
                                                   "--only", "dense,keynorm"])
    rows = {r["scorer"]: r for r in report["cells"][0]["rows"]}
    assert rows["keynorm"]["layer_fraction"] == 1.0 and rows["keynorm"]["nll"] != rows["dense"]["nll"]
    record = json.loads((out / "continuation" / "wikitext_48" / "keynorm.json").read_text())
    assert record["fingerprint"]["kv"]["score"]["_target_"] == "my_kv.key_norm.KeyNormScore"
    assert record["kv_kept_fraction"] == pytest.approx(0.63, abs=0.03)
    assert "`keynorm` `kv=keynorm`: the dense prefill's KV cache cut to 0.63" in (out / "eval.md").read_text()
