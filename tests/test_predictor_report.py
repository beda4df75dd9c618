"""The committed predictor report: cached cells, fingerprints, paired statistics on the page."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from sdtp.config import REPO_ROOT, compose
from sdtp.errors import ConfigError
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.reports import page_check, predictor_eval
from sdtp.reports.continuation_cells import (cell_overrides, predictor_hashes, prior_weights, prompt_kind,
                                            row_scorer)
from sdtp.reports.predictor_options import PRIOR_OPTIONS, ScorerSpec, parse_args, scorer_specs
from sdtp.scorers.lexical import WINDOW
from sdtp.scorers.predictor import PRIORS
from sdtp.utils import atomic_path

pytestmark = pytest.mark.usefixtures("single_thread")


def _dolly(tmp_path: Path) -> Path:
    """12 closed-QA rows, enough for 3 passage_qa segments at 300 tokens."""
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"What is {i}?", "context": f"Fact {i}. " + "more text. " * 30,
                                        "response": f"{i}.", "category": "closed_qa"}) + "\n" for i in range(12)))
    return path


@pytest.fixture
def setup(tmp_path):
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 12)
    c4 = tmp_path / "c4.jsonl"
    c4.write_text("".join(json.dumps({"text": f"Document {i}: " + "words and more words. " * 8}) + "\n"
                          for i in range(8)))
    news = tmp_path / "multi_news.jsonl"
    news.write_text("".join(json.dumps({"input": "", "context": f"Passage {i}: " + "the council met again. " * 20,
                                        "answers": [f"Council meeting number {i} ended."]}) + "\n" for i in range(4)))
    predictor = tmp_path / "predictor"
    meta = PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4)
    TokenPredictor(meta).save(predictor)  # untrained: the report only needs a checkpoint that fits
    out = tmp_path / "out"
    argv = ["--model", "tiny-llama", "--contexts", "48", "--cont-len", "8", "--num-segments", "3",
            "--random-seeds", "0,1", "--wikitext-file", str(wiki), "--c4-file", str(c4), "--c4-docs", "1:7",
            "--multi-news-file", str(news), "--datasets", "wikitext,c4,multi_news",
            "--out", str(out), "--predictor", f"sdtp={predictor}"]
    return argv, out


def _cache(out, cell, scorer):
    return out / "continuation" / cell / f"{scorer}.json"


def _rows(report, dataset):
    cell = next(c for c in report["cells"] if c["dataset"] == dataset)
    return cell, {r["scorer"]: r for r in cell["rows"]}


def test_computes_selected_scorers_and_pairs_random_on_the_seed_mean(setup):
    argv, out = setup
    report = predictor_eval.main([*argv, "--only", "dense,random,positional,sdtp"])
    cell, rows = _rows(report, "c4")
    assert set(rows) == {"dense", "random", "random_s0", "random_s1", "positional", "sdtp"}
    assert cell["missing"] == ["norm", "lazyllm", "lexical"]
    seeds = [json.loads(_cache(out, "c4_48", f"random_s{s}").read_text())["nll"] for s in (0, 1)]
    assert rows["random"]["nll"] == pytest.approx(sum(map(sum, seeds)) / 6)
    assert rows["random_s0"]["nll"] != rows["random_s1"]["nll"]  # different seeds, different masks
    assert rows["sdtp"]["layer_fraction"] == rows["positional"]["layer_fraction"] < 1.0  # same schedule
    assert {(c["a"], c["b"]) for c in cell["comparisons"]} == {("sdtp", n) for n in ("dense", "random", "positional")}
    assert all(0.0 <= c["p_holm"] <= 1.0 and c["p_holm"] >= c["p"] for c in cell["comparisons"])
    page = (out / "eval.md").read_text()
    assert "### c4, context 48 (3 segments)" in page and "random (mean of 2 seeds)" in page
    assert "pooled over c4, multi_news, wikitext, context 48" in page and "logical CPUs" in page
    assert "### multi_news, context 48 (3 segments)" in page
    assert "KV cache" not in page  # no KV policy on this page: the column would repeat tokens/layer


def test_renders_fabricated_caches_and_ignores_a_mismatched_fingerprint(setup, monkeypatch):
    argv, out = setup
    predictor_eval.main([*argv, "--only", "dense,sdtp,positional,norm"])
    cell = "wikitext_48"
    for scorer, nll in (("dense", [1.0, 2.0, 3.0]), ("sdtp", [2.0, 4.0, 9.0]), ("positional", [2.0, 4.0, 9.0])):
        record = json.loads(_cache(out, cell, scorer).read_text())
        _cache(out, cell, scorer).write_text(json.dumps({**record, "nll": nll}))
    # A norm cache that claims another schedule: must be ignored, never shown.
    norm = json.loads(_cache(out, cell, "norm").read_text())
    norm["fingerprint"]["schedule"]["keep_fractions"] = [0.5, 0.4, 0.3]
    _cache(out, cell, "norm").write_text(json.dumps({**norm, "nll": [0.0, 0.0, 0.0]}))
    monkeypatch.setattr(predictor_eval, "compute", lambda *a: pytest.fail("render-only must not compute"))
    shown = (out / "eval.md").read_text()
    with pytest.raises(ConfigError, match=r"shows 1 cell\(s\) this run would drop \(wikitext_48/norm\).*--replace"):
        predictor_eval.main([*argv, "--render-only"])  # the page shows norm's cell: never lost silently
    assert (out / "eval.md").read_text() == shown
    report = predictor_eval.main([*argv, "--render-only", "--replace"])
    table, rows = _rows(report, "wikitext")
    assert "norm" not in rows and "norm" in table["missing"]
    # sdtp - dense = [1, 2, 6]: mean 3, sd sqrt(7); df = 2 closed form t_{0.975} = 0.95 sqrt(2 / 0.0975).
    delta = rows["sdtp"]["delta_vs_dense"]
    half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) * math.sqrt(7 / 3)
    assert (delta["mean"], delta["low"], delta["high"]) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    same = next(c for c in table["comparisons"] if c["b"] == "positional")
    assert same["identical"] and same["p"] == 1.0
    page = (out / "eval.md").read_text()
    assert f"| sdtp | 5.0000 | {math.exp(5):.3f} | +3.0000 [{3 - half:+.4f}, {3 + half:+.4f}] |" in page
    assert "| sdtp − positional | identical on all 3 |" in page
    monkeypatch.undo()
    # Computing norm again replaces the mismatched file with a valid one.
    report = predictor_eval.main([*argv, "--only", "norm"])
    _, rows = _rows(report, "wikitext")
    assert "norm" in rows and rows["norm"]["nll"] > 0.0


def test_a_page_keeps_its_cells_when_fewer_are_asked_for(setup):
    """Leaving a dataset out of the command would drop its cells from the page: refused before any cell runs."""
    argv, out = setup
    predictor_eval.main([*argv, "--only", "dense"])
    with pytest.raises(ConfigError, match=r"shows 1 cell\(s\) this run would drop \(c4_48/dense\)"):
        predictor_eval.main([*argv, "--datasets", "wikitext,multi_news", "--only", "positional"])
    assert not _cache(out, "wikitext_48", "positional").exists()  # refused before computing
    report = predictor_eval.main([*argv, "--datasets", "wikitext,multi_news", "--render-only", "--replace"])
    assert [c["dataset"] for c in report["cells"]] == ["wikitext", "multi_news"]


def test_render_only_finds_cells_computed_where_auto_meant_another_dtype(setup, monkeypatch):
    """``model.dtype=auto`` is bf16 on a CPU with native bf16 and fp32 elsewhere; the page's own command re-renders
    it on either machine, loading the model in the dtype its cells were computed in."""
    argv, out = setup
    auto = [*argv, "--override", "model.dtype=auto"]
    monkeypatch.setattr("sdtp.models.loading.cpu_has_native_bf16", lambda: True)
    for where in ("sdtp.reports.continuation_cells", "sdtp.benchmark.environment"):  # the cells' and the page's
        monkeypatch.setattr(f"{where}.cpu_model", lambda: "a CPU with bf16")
    computed = predictor_eval.main([*auto, "--only", "dense,positional"])
    assert computed["machine"]["dtype"] == "bfloat16"
    monkeypatch.setattr("sdtp.models.loading.cpu_has_native_bf16", lambda: False)  # another machine
    monkeypatch.setattr("sdtp.benchmark.environment.cpu_model", lambda: "a CPU without")
    monkeypatch.setattr(predictor_eval, "compute", lambda *a: pytest.fail("render-only must not compute"))
    rendered = predictor_eval.main([*auto, "--render-only"])
    assert rendered["machine"]["dtype"] == "bfloat16"
    assert rendered["cells"] == computed["cells"] and rendered["caches"] == computed["caches"]
    assert "cells computed on a CPU with bf16 (6);" in rendered["header"]["Machine"]
    assert "cell wall times in eval.json" in computed["header"]["Machine"]  # all computed where it renders
    # Computing runs in this machine's dtype, so no bf16 cell matches: the page would lose them all.
    with pytest.raises(ConfigError, match=r"shows 6 cell\(s\) this run would drop"):
        predictor_eval.main([*auto, "--only", "norm"])


def test_unknown_only_name_fails(setup):
    argv, _ = setup
    with pytest.raises(Exception, match="--only"):
        predictor_eval.main([*argv, "--only", "dense,sdpt"])


def test_passage_qa_cell_and_the_prior_weight_in_the_fingerprint(setup, monkeypatch, tmp_path):
    """The long-document QA cell is computed like the others; a predictor row's fingerprint records the
    weight its prompts get: the chat weight only when the model has a chat template."""
    argv, out = setup
    dolly = _dolly(tmp_path)
    meta = json.loads((tmp_path / "predictor" / "predictor.json").read_text())
    (tmp_path / "predictor" / "predictor.json").write_text(json.dumps({**meta, "recency_weight": 1.0,
                                                                       "recency_weight_chat": 0.5}))
    qa = [*argv, "--datasets", "passage_qa", "--contexts", "300", "--dolly-file", str(dolly), "--passage-qa-start", "2"]
    report = predictor_eval.main([*qa, "--only", "dense,sdtp"])
    _, rows = _rows(report, "passage_qa")
    assert set(rows) == {"dense", "sdtp"}
    assert "`passage_qa` = records 2..4" in (out / "eval.md").read_text()
    cached = json.loads(_cache(out, "passage_qa_300", "sdtp").read_text())["fingerprint"]
    assert cached["recency_weight"] == 1.0  # the tiny byte tokenizer has no chat template: text weight
    model = type("Model", (), {"sdtp_chat_suffix": (1, 2)})()
    spec = ScorerSpec("sdtp", (), "predictor", tmp_path / "predictor")
    cfg = compose("eval", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path / 'predictor'}"])
    assert prior_weights(cfg, spec, model, "passage_qa") == {"recency": 0.5, "norm": 0.0, "attention": 0.0,
                                                             "lexical": 0.0}
    assert prior_weights(cfg, spec, model, "wikitext") == {"recency": 1.0, "norm": 0.0, "attention": 0.0,
                                                           "lexical": 0.0}
    assert not {"norm_weight", "attention_weight", "lexical_weight"} & set(cached)  # absent at 0: older cells stay valid


@pytest.mark.parametrize("prior,suffix", [("norm", "nw"), ("attention", "aw"), ("lexical", "lw")])
def test_prior_weight_rows_are_fingerprinted_and_selected(setup, tmp_path, prior, suffix):
    """``--norm-weights`` / ``--attention-weights`` add <predictor>_nw<w> / _aw<w> rows whose fingerprints
    record the weight; with ``--write-selected`` the chosen weight lands in predictor.json as <prior>_weight."""
    argv, out = setup
    rows_tried = f"sdtp_{suffix}0,sdtp_{suffix}2"
    report = predictor_eval.main([*argv, f"--{prior}-weights", "0,2", "--only", f"dense,norm,{rows_tried}",
                                  "--write-selected"])
    _, rows = _rows(report, "wikitext")
    assert set(rows_tried.split(",")) <= set(rows)
    cell = next(p.parent.name for p in out.glob(f"continuation/*/sdtp_{suffix}2.json"))
    assert json.loads(_cache(out, cell, f"sdtp_{suffix}2").read_text())["fingerprint"][f"{prior}_weight"] == 2.0
    assert f"{prior}_weight" not in json.loads(_cache(out, cell, f"sdtp_{suffix}0").read_text())["fingerprint"]
    chosen = report[f"{prior}_selection"]["sdtp"]["text"]["selected"]
    meta = json.loads((tmp_path / "predictor" / "predictor.json").read_text())
    assert meta[f"{prior}_weight"] == chosen
    assert f"{prior.capitalize()} weight selection" in (out / "eval.md").read_text()


def test_chat_datasets_select_text_weights_for_a_model_without_chat_template(setup, tmp_path):
    """A base model reads passage_qa as plain text, so its rows get the text weight (:func:`prior_weights`):
    the weight selected on those cells must be written as ``<prior>_weight``, never as the chat weight."""
    argv, out = setup
    dolly = _dolly(tmp_path)
    report = predictor_eval.main([*argv, "--datasets", "passage_qa", "--contexts", "300", "--dolly-file", str(dolly),
                                  "--lexical-weights", "0,2", "--only", "dense,norm,sdtp_lw0,sdtp_lw2",
                                  "--write-selected"])
    assert list(report["lexical_selection"]["sdtp"]) == ["text"]
    assert report["lexical_selection"]["sdtp"]["text"]["cells"] == 1
    meta = json.loads((tmp_path / "predictor" / "predictor.json").read_text())
    assert meta["lexical_weight"] == report["lexical_selection"]["sdtp"]["text"]["selected"]
    assert meta["lexical_weight_chat"] is None
    page = (out / "eval.md").read_text()
    assert "hotpotqa prompt as plain text (no chat template)" in page and "(1 cell)" in page
    assert prompt_kind("passage_qa", type("Model", (), {"sdtp_chat_suffix": (1, 2)})()) == "chat"
    assert prompt_kind("wikitext", type("Model", (), {"sdtp_chat_suffix": (1, 2)})()) == "text"


def test_select_priors_narrows_what_write_selected_changes(setup, tmp_path):
    """Priors are tuned one after another: ``--select-priors lexical`` writes the lexical weight and leaves
    the norm weight the checkpoint has, although the norm rows are on the page too."""
    argv, out = setup
    path = tmp_path / "predictor" / "predictor.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "norm_weight": 0.5}))
    report = predictor_eval.main([*argv, "--datasets", "wikitext", "--norm-weights", "0,2", "--lexical-weights", "0,2",
                                  "--only", "dense,norm,sdtp_nw0,sdtp_nw2,sdtp_lw0,sdtp_lw2",
                                  "--write-selected", "--select-priors", "lexical"])
    meta = json.loads(path.read_text())
    assert meta["norm_weight"] == 0.5 and "norm_selection" not in report
    assert meta["lexical_weight"] == report["lexical_selection"]["sdtp"]["text"]["selected"]
    with pytest.raises(SystemExit):
        parse_args(["--select-priors", "typo"])


def test_seed_group_pairs_on_the_mean_of_its_predictors(setup, tmp_path):
    argv, out = setup
    second = tmp_path / "predictor2"
    TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4)).save(second)
    argv = [*argv, "--predictor", f"sdtp2={second}", "--seed-group", "sdtp_seeds=sdtp,sdtp2", "--datasets", "c4"]
    report = predictor_eval.main([*argv, "--only", "dense,positional,sdtp,sdtp2"])
    cell, rows = _rows(report, "c4")
    members = [json.loads(_cache(out, "c4_48", name).read_text())["nll"] for name in ("sdtp", "sdtp2")]
    assert rows["sdtp_seeds"]["nll"] == pytest.approx(sum(map(sum, members)) / 6)
    assert rows["sdtp_seeds"]["seeds"] == ["sdtp", "sdtp2"] and rows["sdtp2"]["seed_of"] == "sdtp_seeds"
    order = [r["scorer"] for r in cell["rows"]]
    assert order.index("sdtp_seeds") < order.index("sdtp") < order.index("sdtp2")
    # The group stands for its members in the tests: no member is compared, the group with every other row.
    assert {(c["a"], c["b"]) for c in cell["comparisons"]} == {("sdtp_seeds", n) for n in ("dense", "positional")}
    assert "sdtp_seeds (mean of 2 seeds)" in (out / "eval.md").read_text()


def test_seed_group_of_scorer_rows_is_a_baseline(setup):
    """A group of --scorer rows (random with two seeds at another keep ratio) pairs on its members' mean and
    is compared with the predictor like ``random``, never as a focus row; a group mixing kinds is refused."""
    argv, out = setup
    rows = []
    for seed in (1, 2):
        rows += ["--scorer", f"r{seed}=random", "--row-override", f"r{seed}=pruning.scorer.seed={seed}",
                 "--row-override", f"r{seed}=pruning.keep_ratio=0.8"]
    argv = [*argv, *rows, "--datasets", "c4"]
    report = predictor_eval.main([*argv, "--seed-group", "r=r1,r2", "--only", "dense,sdtp,r1,r2"])
    cell, by_name = _rows(report, "c4")
    members = [json.loads(_cache(out, "c4_48", name).read_text())["nll"] for name in ("r1", "r2")]
    assert members[0] != members[1]
    assert by_name["r"]["nll"] == pytest.approx(sum(map(sum, members)) / 6)
    pairs = {(c["a"], c["b"]) for c in cell["comparisons"]}
    assert ("sdtp", "r") in pairs and not {a for a, _ in pairs} - {"sdtp"}
    assert "(seeds, listed under it)" in (out / "eval.md").read_text()
    assert "except `r1`, `r2` with `pruning.keep_ratio=0.8`:" in report["header"]["Schedule"]  # named together
    with pytest.raises(ConfigError, match="one kind"):
        predictor_eval.main([*argv, "--seed-group", "g=sdtp,r1", "--only", "dense"])


def test_a_predictor_row_at_a_subset_of_its_layers_says_so(setup):
    """A row with ``+pruning.scorer.select_stages=true`` and fewer stage layers runs with the checkpoint's stages
    there (fewer tokens pruned: more tokens per layer) and the page names both."""
    argv, _ = setup
    sdtp = next(a for a in argv if a.startswith("sdtp="))
    report = predictor_eval.main([*argv, "--datasets", "c4", "--predictor", sdtp.replace("sdtp=", "sub=", 1),
                                  "--row-override", "sub=+pruning.scorer.select_stages=true",
                                  "--row-override", "sub=pruning.layers=[1,3]", "--only", "dense,sdtp,sub"])
    _, rows = _rows(report, "c4")
    assert rows["sub"]["layer_fraction"] > rows["sdtp"]["layer_fraction"]
    assert "except `sub` (and its prior rows) with `pruning.layers=[1,3]`" in report["header"]["Schedule"]
    assert "`sub` = " in report["header"]["Scorers"] and "(`select_stages`)" in report["header"]["Scorers"]


@pytest.mark.parametrize("group", ["random=sdtp,sdtp2", "g=sdtp,positional", "g=sdtp,sdtp"])
def test_a_bad_seed_group_fails_before_any_cell(setup, tmp_path, monkeypatch, group):
    argv, _ = setup
    second = tmp_path / "predictor2"
    TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4)).save(second)
    monkeypatch.setattr(predictor_eval, "compute", lambda *a: pytest.fail("must fail before computing"))
    with pytest.raises(ConfigError, match="--seed-group"):
        predictor_eval.main([*argv, "--predictor", f"sdtp2={second}", "--seed-group", group])


def test_row_override_pairs_a_predictor_at_its_own_schedule(setup, tmp_path):
    """Page schedule from --override, one predictor row at another schedule (--row-override): every other
    pruned row runs the page's schedule, that row (and only it) its own; both are paired on one page."""
    argv, out = setup
    late = tmp_path / "late"
    TokenPredictor(PredictorMeta(hidden_size=64, layers=[2, 3], base_model="tiny-llama", num_layers=4)).save(late)
    argv = [*argv, "--datasets", "c4", "--predictor", f"late={late}", "--override", "pruning.layers=[2,3]",
            "--override", "pruning.keep_ratio=0.5", "--row-override", "sdtp=pruning.layers=[1,2,3]",
            "--row-override", "sdtp=pruning.keep_ratio=0.9", "--row-override", "late=pruning.scorer.recency_weight=4",
            "--row-override", "late=pruning.scorer.recency_weight_chat=0"]
    report = predictor_eval.main([*argv, "--only", "dense,positional,sdtp,late"])
    _, rows = _rows(report, "c4")
    assert rows["late"]["layer_fraction"] == rows["positional"]["layer_fraction"] < rows["sdtp"]["layer_fraction"] < 1
    sdtp = json.loads(_cache(out, "c4_48", "sdtp").read_text())["fingerprint"]["schedule"]
    assert sdtp["layers"] == [1, 2, 3] and sdtp["keep_fractions"][0] == pytest.approx(0.9)
    page = (out / "eval.md").read_text()
    assert ("set by `--override` for every pruned scorer, except `sdtp` (and its prior rows) with "
            "`pruning.layers=[1,2,3]` `pruning.keep_ratio=0.9`: stages before layers [2, 3]") in page
    assert "set by its overrides: recency weight 4 on raw text, 0 on chat prompts)" in page
    assert "as shipped: recency weight 0 for every prompt)" in page  # sdtp: its checkpoint's weights
    with pytest.raises(SystemExit):
        parse_args([*argv, "--row-override", "positional=pruning.keep_ratio=0.9"])


def test_a_weight_row_resets_chat_weights_a_row_override_set(setup, tmp_path):
    """``sdtp_rw0`` (the predictor alone) must not keep the chat weights ``--row-override`` gave ``sdtp``."""
    argv, _ = setup
    opts = parse_args([*argv, "--row-override", "sdtp=pruning.scorer.lexical_weight_chat=8",
                       "--row-override", "sdtp=pruning.scorer.recency_weight_chat=2", "--recency-weights", "0"])
    specs = {s.name: s for s in scorer_specs(opts, str(tmp_path))}
    weights = {}
    for name in ("sdtp", "sdtp_rw0"):
        cfg = compose("eval", ["model=tiny-llama", "eval=continuation", *specs[name].overrides])
        scorer = row_scorer(cfg, specs[name])
        weights[name] = [scorer.prior_weight(prior, chat=True) for prior in ("recency", "lexical")]
    assert weights == {"sdtp": [2.0, 8.0], "sdtp_rw0": [0.0, 0.0]}


def test_scorer_knob_rows_have_their_own_fingerprints_and_page_text(setup, tmp_path):
    """A row overriding the lexical prior's window or the predictor's pooling window records it in its fingerprint
    (so its cells never pass for the default's) and on the page; the default row's fingerprint keeps the default
    window and has no pooling key."""
    argv, out = setup
    predictor = str(tmp_path / "predictor")
    rows = [*argv, "--predictor", f"sdtp={predictor}", "--predictor", f"sdtp_lxw16={predictor}",
            "--predictor", f"sdtp_pool2={predictor}", "--row-override", "sdtp_lxw16=pruning.scorer.lexical_window=16",
            "--row-override", "sdtp_pool2=pruning.scorer.pool_window=2", "--lexical-weights", "2"]
    names = ("sdtp_lw2", "sdtp_lxw16_lw2", "sdtp_pool2_lw2")
    report = predictor_eval.main([*rows, "--only", ",".join(("dense", *names))])
    _, cells = _rows(report, "wikitext")
    assert set(names) <= set(cells)
    prints = {name: json.loads(_cache(out, "wikitext_48", name).read_text())["fingerprint"] for name in names}
    assert {name: p["lexical"]["window"] for name, p in prints.items()} == {
        "sdtp_lw2": WINDOW, "sdtp_lxw16_lw2": 16, "sdtp_pool2_lw2": WINDOW}
    assert {name: p.get("pool_window") for name, p in prints.items()} == {
        "sdtp_lw2": None, "sdtp_lxw16_lw2": None, "sdtp_pool2_lw2": 2}
    for key in ("lexical_window", "pool_window"):  # cells computed before the knobs stay valid
        assert key not in prints["sdtp_lw2"]["scorer"]
    assert cells["sdtp_pool2_lw2"]["nll"] != cells["sdtp_lw2"]["nll"]
    page = (out / "eval.md").read_text()
    assert "lexical match averaged over 16 tokens each side (its override)" in page
    assert "predictor scores averaged over 2 alive tokens each side (its override)" in page


def test_a_row_the_model_refuses_is_named_on_the_page_not_run(setup, tmp_path):
    """A KV row on a model whose every layer slides (Mistral v0.1) has nothing to cut: the page says why, before any
    cell, and runs the other rows."""
    argv, out = setup
    mistral = [*argv, "--model", "tiny-mistral", "--override", "+model.arch.sliding_window=16", "--datasets",
               "wikitext", "--predictor", f"sdtp={tmp_path / 'none'}", "--kv", "hh=h2o"]
    report = predictor_eval.main([*mistral, "--only", "dense,hh,positional"])
    cell, rows = _rows(report, "wikitext")
    assert set(rows) == {"dense", "positional"} and "hh" not in cell["missing"]
    assert not _cache(out, "wikitext_48", "hh").exists()
    assert report["header"]["Not run on this model"].startswith("`hh`: KV compression (kv=h2o) compresses full-")
    assert "every layer of 'mistral' is a sliding-window one" in (out / "eval.md").read_text()
    other_page = [*argv, "--render-only", "--replace"]  # the tiny-llama page, in the same folder
    assert "Not run on this model" not in predictor_eval.main(other_page)["header"]  # full attention


def test_a_scorer_row_of_any_pruning_method_is_paired_and_compared(setup):
    """``--scorer NAME=METHOD``: a row of its own; here the norm scorer again, so it must equal the norm row."""
    argv, out = setup
    report = predictor_eval.main([*argv, "--datasets", "wikitext", "--scorer", "hn=norm",
                                  "--only", "dense,norm,hn,sdtp"])
    cell, rows = _rows(report, "wikitext")
    assert rows["hn"]["nll"] == rows["norm"]["nll"] and _cache(out, "wikitext_48", "hn").is_file()
    assert {("sdtp", "hn"), ("sdtp", "norm")} <= {(c["a"], c["b"]) for c in cell["comparisons"]}
    assert "`hn` `pruning=norm`" in (out / "eval.md").read_text()


@pytest.mark.parametrize("item", ["norm=random", "random=norm", "sdtp=norm", "bad name=norm"])
def test_a_scorer_row_needs_a_new_name(setup, item):
    argv, _ = setup
    with pytest.raises(ConfigError, match="the name must be new"):  # the later row of a clash is named
        predictor_eval.main([*argv, "--scorer", item, "--only", "dense"])


def test_a_scorer_row_needs_name_and_method(setup):
    argv, _ = setup
    with pytest.raises(SystemExit):
        predictor_eval.main([*argv, "--scorer", "hn", "--only", "dense"])


def test_a_kv_row_compresses_the_dense_prefill_and_is_paired(setup):
    """``--kv NAME=METHOD``: the dense prefill's cache cut by a KV policy; kv.ratio=1.0 keeps it whole (= dense)."""
    argv, out = setup
    whole = predictor_eval.main([*argv, "--datasets", "wikitext", "--kv", "whole=h2o", "--kv-ratio", "1.0",
                                 "--out", str(out / "whole"), "--only", "dense,whole"])
    _, rows = _rows(whole, "wikitext")
    assert rows["whole"]["nll"] == pytest.approx(rows["dense"]["nll"], rel=1e-5)
    report = predictor_eval.main([*argv, "--datasets", "wikitext", "--kv", "hh=h2o", "--only", "dense,norm,hh,sdtp"])
    cell, rows = _rows(report, "wikitext")
    assert rows["hh"]["nll"] != pytest.approx(rows["dense"]["nll"], rel=1e-4) and rows["hh"]["layer_fraction"] == 1.0
    record = json.loads(_cache(out, "wikitext_48", "hh").read_text())
    assert record["kv_kept_fraction"] == pytest.approx(0.4, abs=0.03)
    assert record["fingerprint"]["kv"]["method"] == "h2o"
    assert "kv" not in json.loads(_cache(out, "wikitext_48", "norm").read_text())["fingerprint"]
    assert ("sdtp", "hh") in {(c["a"], c["b"]) for c in cell["comparisons"]}
    scorers = report["header"]["Scorers"]
    assert "`hh` `kv=h2o`: the dense prefill's KV cache cut to 0.4 of each layer's entries" in scorers


def test_a_predictor_row_with_a_kv_policy_prunes_and_compresses(setup):
    """A hybrid row (``--row-override NAME=kv=...``): a milder schedule, then the KV policy cuts what the pruned
    prefill left; its KV cache = tokens/layer x the kept share, and the header names its overrides."""
    argv, out = setup
    hybrid = ["--predictor", f"mix={out.parent / 'predictor'}", "--row-override", "mix=pruning.keep_ratio=0.95",
              "--row-override", "mix=kv=h2o", "--row-override", "mix=kv.ratio=0.5"]
    report = predictor_eval.main([*argv, "--datasets", "wikitext", *hybrid, "--only", "dense,sdtp,mix"])
    cell, rows = _rows(report, "wikitext")
    record = json.loads(_cache(out, "wikitext_48", "mix").read_text())
    assert record["kv_kept_fraction"] == pytest.approx(0.5, abs=0.03)
    assert record["fingerprint"]["kv"]["ratio"] == 0.5
    assert record["fingerprint"]["schedule"]["keep_fractions"][0] == pytest.approx(0.95)
    assert rows["sdtp"]["layer_fraction"] < rows["mix"]["layer_fraction"] < 1.0
    assert rows["mix"]["kv_fraction"] == pytest.approx(rows["mix"]["layer_fraction"] * record["kv_kept_fraction"])
    assert rows["sdtp"]["kv_fraction"] is None
    assert {("sdtp", "mix"), ("mix", "dense")} <= {(c["a"], c["b"]) for c in cell["comparisons"]}
    page = (out / "eval.md").read_text()
    assert "| tokens/layer | KV cache |" in page
    layer = f"{100 * rows['sdtp']['layer_fraction']:.1f}%"
    assert f"| {layer} | {layer} |" in page  # no KV policy: the cache holds what reached each layer
    assert f"| {100 * rows['mix']['kv_fraction']:.1f}% |" in page
    assert "except `mix` (and its prior rows) with `pruning.keep_ratio=0.95` `kv=h2o` `kv.ratio=0.5`" in page


def test_a_kv_row_on_a_sliding_window_model_cuts_its_global_layers(setup, tmp_path):
    """On Gemma3 a ``--kv`` row runs: its global layer is cut (the KV fraction counts the layers the policy cuts;
    the sliding ones keep their window)."""
    argv, _ = setup
    gemma = [*argv, "--model", "tiny-gemma3", "--datasets", "wikitext", "--predictor", f"sdtp={tmp_path / 'none'}"]
    report = predictor_eval.main([*gemma, "--kv", "hh=h2o", "--kv-ratio", "0.5", "--only", "dense,hh,lazyllm"])
    rows = _rows(report, "wikitext")[1]
    assert "Not run on this model" not in report["header"] and "lazyllm" in rows  # the attention scorer runs too
    assert rows["hh"]["layer_fraction"] == 1.0 and rows["hh"]["kv_fraction"] == pytest.approx(0.5, abs=0.05)
    assert rows["hh"]["nll"] != rows["dense"]["nll"]


def test_a_refilled_scorer_row_keeps_the_pruned_layout_after_a_dense_prefill(setup):
    """``--row-override NAME=+pruning.refill=true`` on a ``--scorer`` row: the norm row's kept tokens, refilled;
    tokens/layer 100%, KV cache = the norm row's tokens/layer, a fingerprint of its own, a header line."""
    argv, out = setup
    refill = ["--scorer", "hn=norm", "--row-override", "hn=+pruning.refill=true"]
    report = predictor_eval.main([*argv, "--datasets", "wikitext", *refill, "--only", "dense,norm,hn,sdtp"])
    cell, rows = _rows(report, "wikitext")
    record = json.loads(_cache(out, "wikitext_48", "hn").read_text())
    assert record["fingerprint"]["refill"] is True
    assert "refill" not in json.loads(_cache(out, "wikitext_48", "norm").read_text())["fingerprint"]
    assert rows["hn"]["layer_fraction"] == 1.0 and rows["hn"]["nll"] != rows["norm"]["nll"]
    assert rows["hn"]["kv_fraction"] == pytest.approx(rows["norm"]["layer_fraction"])
    assert ("sdtp", "hn") in {(c["a"], c["b"]) for c in cell["comparisons"]}
    assert "`hn` prefill twice" in report["header"]["Refill"]
    assert "except `hn` with `+pruning.refill=true`" in report["header"]["Schedule"]
    knob = predictor_eval.main([*argv, "--datasets", "wikitext", "--scorer", "lz=lazyllm", "--row-override",
                                "lz=pruning.scorer.num_queries=4", "--only", "dense,lz", "--replace"])
    assert "`lz` `pruning=lazyllm` `pruning.scorer.num_queries=4`" in knob["header"]["Scorers"]
    assert json.loads(_cache(out, "wikitext_48", "lz").read_text())["fingerprint"]["scorer"]["num_queries"] == 4
    with pytest.raises(SystemExit):  # a row override names a --predictor or --scorer row
        predictor_eval.main([*argv, "--row-override", "norm=+pruning.refill=true", "--only", "dense"])


def test_a_nesting_ablation_row_has_its_own_fingerprint_and_header_line(setup):
    """``--row-override NAME=+pruning.revive=true`` (or ``+pruning.merge_weight=w``): another pruner, the same
    scorer; the cell's fingerprint names the setting, so the plain row's cell is never reused for it."""
    argv, out = setup
    rows = ["--scorer", "rv=norm", "--row-override", "rv=+pruning.revive=true",
            "--scorer", "mg=norm", "--row-override", "mg=+pruning.merge_weight=0.5"]
    report = predictor_eval.main([*argv, "--datasets", "wikitext", *rows, "--only", "dense,norm,rv,mg"])
    fingerprints = {name: json.loads(_cache(out, "wikitext_48", name).read_text())["fingerprint"]
                    for name in ("norm", "rv", "mg")}
    assert "pruner" not in fingerprints["norm"]
    assert fingerprints["rv"]["pruner"] == {"revive": True} and fingerprints["mg"]["pruner"] == {"merge_weight": 0.5}
    assert "`rv` with `+pruning.revive=true`" in report["header"]["Schedule"]
    _, cells = _rows(report, "wikitext")
    assert cells["mg"]["nll"] != cells["norm"]["nll"]


def test_a_kv_row_with_per_layer_budgets(setup):
    """``--row-override NAME=+kv.layer_ratios=[...]`` on a ``--kv`` row: each layer's cache cut to its own ratio."""
    argv, out = setup
    pyramid = ["--kv", "pyr=h2o", "--row-override", "pyr=+kv.layer_ratios=[1,1,0.5,0.5]"]
    report = predictor_eval.main([*argv, "--datasets", "wikitext", *pyramid, "--only", "dense,pyr"])
    _, rows = _rows(report, "wikitext")
    record = json.loads(_cache(out, "wikitext_48", "pyr").read_text())
    assert record["fingerprint"]["kv"]["layer_ratios"] == [1, 1, 0.5, 0.5]
    assert record["kv_kept_fraction"] == pytest.approx(0.75, abs=0.03) and rows["pyr"]["layer_fraction"] == 1.0
    assert "`pyr` `kv=h2o`: the dense prefill's KV cache cut layer by layer to `kv.layer_ratios` (mean 0.75" in \
        report["header"]["Scorers"]
    assert "except `pyr` with `+kv.layer_ratios=[1,1,0.5,0.5]`" in report["header"]["Schedule"]
    nested = predictor_eval.main([*argv, "--datasets", "wikitext", "--kv", "nest=h2o", "--row-override",
                                  "nest=+kv.layer_ratios=[1,0.8,0.6,0.5]", "--row-override", "nest=+kv.per_head=false",
                                  "--row-override", "nest=+kv.nested=true", "--only", "dense,nest", "--replace"])
    assert ("`nest` `kv=h2o`: the dense prefill's KV cache cut layer by layer to `kv.layer_ratios` (mean 0.725 of the "
            "entries), one token set per layer for all KV heads, each layer within the entries the layer before kept") \
        in nested["header"]["Scorers"]


def test_page_check_re_renders_a_page_from_its_own_command_and_names_what_went_stale(setup, tmp_path):
    """``scripts/check_pages.py``: a page whose cells all match re-renders to the same tables; once its predictor
    checkpoint changes, the page is stale and the reason names the fingerprint key."""
    argv, out = setup
    page_argv = [*argv, "--datasets", "wikitext", "--only", "dense,positional,sdtp"]
    predictor_eval.main(page_argv)
    # Committed pages name repository-relative paths; these live in tmp_path, which the page shows as <abs>/...
    page = json.loads((out / "eval.json").read_text())
    page["command"] = "PYTHONPATH=. python scripts/predictor_report.py " + shlex.join(page_argv)
    (out / "eval.json").write_text(json.dumps(page))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    same = page_check.check_page(out, env)
    assert same["status"] == "same", same
    meta = PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4)
    TokenPredictor(meta).save(tmp_path / "predictor")  # retrained: other weights, same path
    found = page_check.check_page(out, env)
    assert found["status"] == "stale" and found["reason"].startswith("1 cell(s) no longer match")
    assert "predictor_sha256" in found["reason"]
    assert json.loads((out / "eval.json").read_text())["caches"]  # the committed page itself is left alone


def test_page_check_compares_what_the_committed_page_showed():
    """A field a later renderer adds is not a change; a different, missing or extra value is."""
    committed = {"rows": [{"scorer": "sdtp", "nll": 2.5}], "missing": []}
    assert page_check.differences(committed, {"rows": [{"scorer": "sdtp", "nll": 2.5, "kv_fraction": None}],
                                              "missing": []}, "cells") == []
    assert page_check.differences(committed, {"rows": [{"scorer": "sdtp", "nll": 2.4}], "missing": []},
                                  "cells") == ["cells.rows[0].nll"]
    assert page_check.differences(committed, {"rows": [], "missing": ["sdtp"]}, "cells") == ["cells.rows",
                                                                                            "cells.missing"]
    assert page_check.differences(committed, {"missing": []}, "cells") == ["cells.rows"]


def test_page_check_compares_the_pages_text_but_not_the_host_or_command_lines():
    """A re-render whose tables agree but whose text differs (e.g. a bound's sign) is a change; the Machine line,
    the listed cell commands and the command block depend on where and how the check renders, and are not."""
    page = ("# t\n\n```bash\nPYTHONPATH=. python scripts/predictor_report.py --out a\n```\n\n"
            "- **Machine.** Xeon, git abc\n- **Cells computed by.** `x`\n\n"
            "| sdtp − dense | +0.0074 [-0.0000, +0.0149] |\n")
    elsewhere = (page.replace("--out a", "--out /tmp/s --replace").replace("Xeon, git abc", "EPYC, git def")
                 .replace("- **Cells computed by.** `x`\n", ""))
    ok = subprocess.CompletedProcess([], 0, "", "")
    tables = {"cells": [{"rows": [{"scorer": "sdtp", "nll": 2.5}]}], "pooled": []}
    assert page_check.outcome(ok, tables, tables, page, elsewhere) == {"status": "same", "reason": ""}
    signed = elsewhere.replace("[-0.0000", "[+0.0000")
    assert page_check.outcome(ok, tables, tables, page, signed) == {
        "status": "changed", "reason": "1 line(s) of the page differ: eval.md:10"}
    assert page_check.outcome(ok, tables, tables)["status"] == "same"  # no markdown given: tables only


def test_every_prior_has_its_weights_option():
    """Adding a prior to PRIORS needs its ``--<prior>-weights`` option (rows <predictor>_<suffix><w>)."""
    assert [prior for prior, *_ in PRIOR_OPTIONS] == list(PRIORS)
    assert parse_args(["--lexical-weights", "0,8"]).lexical_weights == (0.0, 8.0)


def test_a_killed_save_does_not_change_the_predictor_fingerprint(tmp_path):
    """A save killed midway leaves a hidden temporary beside the checkpoint; the cells' fingerprint ignores it."""
    meta = PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4)
    TokenPredictor(meta).save(tmp_path)
    before = predictor_hashes(tmp_path)
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "predictor.safetensors") as tmp:
        tmp.write_bytes(b"half a checkpoint")
        (tmp_path / ".predictor.safetensors.orphan.tmp.safetensors").write_bytes(b"what SIGKILL would leave")
        raise KeyboardInterrupt
    assert predictor_hashes(tmp_path) == before == {"predictor.json": before["predictor.json"],
                                                    "predictor.safetensors": before["predictor.safetensors"]}


@pytest.mark.parametrize("dataset", ["wikitext", "multi_news", "passage_qa", "c4"])
def test_cell_overrides_keep_a_data_path_hydra_would_parse(tmp_path, dataset):
    """A data folder named like a sweep job's (``seed=0``), with a comma and brackets: unquoted, Hydra's override
    grammar refused it or read a sweep; each cell must compose with the path exactly as given."""
    data_dir = tmp_path / "seed=0,[a]"
    files = {"wikitext": "lm/wiki.test.raw", "multi_news": "longbench/multi_news.jsonl",
             "passage_qa": "train/databricks_dolly_15k.jsonl", "c4": "train/c4_en_1k.jsonl"}
    path = data_dir / files[dataset]
    path.parent.mkdir(parents=True)
    path.write_text("{}\n")
    opts = parse_args(["--model", "tiny-llama", "--datasets", dataset])
    cfg = compose("eval", cell_overrides(opts, dataset, 64, str(data_dir)))
    assert cfg.eval.data_file == str(path)
