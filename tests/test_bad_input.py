"""Bad input as a careless user gives it: every case fails before any model work with a message naming
the config key (and the file and line for data), or warns when an override is ignored."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import types

import pytest

from sdtp.cli import generate
from sdtp.config import REPO_ROOT, build_schedule, compose, offline_by_default
from sdtp.errors import ConfigError
from sdtp.scorers.base import Scorer
from sdtp.eval import harness, longbench, perplexity, synthetic

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("override", "message"), [
    ("pruning.keep_ratio=abc", r"pruning\.keep_ratio: expected a number, got 'abc'"),
    ("pruning.keep_ratio=true", r"pruning\.keep_ratio: expected a number, got True"),
    ("pruning.keep_ratio=[0.9,x,0.5]", r"pruning\.keep_ratio\[1\]: expected a number"),
    ("pruning.keep_ratio=[0.9,true,0.5]", r"pruning\.keep_ratio\[1\]"),
    ("pruning.layers=[1,x]", r"pruning\.layers\[1\]: expected a number, got 'x'"),
    ("pruning.layers=[1,2.5]", r"pruning\.layers\[1\]: expected an integer"),
    ("pruning.keep_first=abc", r"pruning\.keep_first: expected a number"),
    ("pruning.keep_first=true", r"pruning\.keep_first: expected a number, got True"),
    ("pruning.keep_recent=abc", r"pruning\.keep_recent"),
    ("pruning.first_layer=abc", r"pruning\.first_layer"),
    ("pruning.num_stages=false", r"pruning\.num_stages"),
])
def test_schedule_keys_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose("generate", ["model=tiny-llama", "pruning=random", override])


@pytest.mark.parametrize(("method", "extra"), [("gemfilter", []), ("fastkv", []), ("random", ["pruning.layers=[1,2]"])])
def test_schedule_keys_explicit_layers_replace_are_refused(method, extra):
    """``pruning=gemfilter pruning.first_layer=1 pruning.num_stages=3`` pruned at gemfilter's one layer (2 of 4),
    silently; pruning.layers=null derives the layers from the keys instead."""
    shadowing = ["pruning.first_layer=1", "pruning.num_stages=3"]
    with pytest.raises(ConfigError, match=r"^pruning\.first_layer, pruning\.num_stages: set on the command line .*"
                                          r"explicit stage layers pruning\.layers=\[\d(, \d)*\].*pruning\.layers=null"):
        compose("generate", ["model=tiny-llama", f"pruning={method}", *extra, *shadowing])
    cfg = compose("generate", ["model=tiny-llama", f"pruning={method}", "pruning.keep_ratio=0.8", "pruning.layers=null",
                               *shadowing])
    assert build_schedule(cfg).layers == (1, 2, 3)
    assert build_schedule(compose("generate", ["model=tiny-llama", f"pruning={method}", *extra])).layers


@pytest.mark.parametrize("task", ["generate", "eval", "bench"])
def test_renumbered_positions_are_refused_where_tokens_follow_the_prompt(task):
    """Renumbered pruned layers hold the prompt at 0..k-1 but later tokens continue at N: every entry point that
    decodes or scores continuations on the pruned cache (all eval runners, perplexity's scored tokens included)
    refuses it before the model loads; the dense model ignores the key."""
    with pytest.raises(ConfigError, match=rf"^pruning\.position_ids=renumber: sdtp-{task} runs tokens on the pruned "
                                          r"cache .*prefill-only ablation"):
        compose(task, ["model=tiny-llama", "pruning=random", "pruning.position_ids=renumber"])
    compose(task, ["model=tiny-llama", "pruning=random", "pruning.position_ids=original"])
    compose(task, ["model=tiny-llama", "pruning=none", "pruning.position_ids=renumber"])


@pytest.mark.parametrize(("target", "message"), [
    ("sdtp_no_such_pkg.nope.Scorer", r"cannot import 'sdtp_no_such_pkg\.nope\.Scorer' \(ModuleNotFoundError.*PATH"),
    ("sdtp.scorers.norm.HiddenNromScorer", r"cannot import .*AttributeError: module 'sdtp\.scorers\.norm'"),
    ("HiddenNormScorer", r"cannot import 'HiddenNormScorer'"),
    ("torch.nn.Linear", r"'torch\.nn\.Linear' is not a subclass of sdtp\.scorers\.base\.Scorer"),
])
def test_scorer_target_is_checked_at_composition(target, message):
    """A misspelt or unimportable scorer class fails when the config is composed, before a model loads."""
    with pytest.raises(ConfigError, match=r"pruning\.scorer\._target_: " + message):
        compose("generate", ["model=tiny-llama", "pruning=norm", f"pruning.scorer._target_={target}"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["pruning=lazyllm", "+pruning.scorer.num_querie=4"],
     r"pruning\.scorer\.num_querie: AttentionScorer takes no such argument \(it takes: num_queries\)"),
    (["pruning=sdtp", "+pruning.scorer.recency=0.5"], r"pruning\.scorer\.recency: PredictorScorer takes no such"),
    (["pruning=norm", "pruning.scorer._target_=sdtp_test_scorers.NeedsArgument"],
     r"pruning\.scorer\.strength: NeedsArgument requires this argument"),
    (["pruning=random", "pruning.scorer.seed=seven"], r"pruning\.scorer\.seed: RandomScorer takes int, got 'seven'"),
    (["pruning=random", "pruning.scorer.seed=true"], r"pruning\.scorer\.seed: RandomScorer takes int, got True"),
    (["pruning=sdtp", "pruning.scorer.recency_weight=high"],
     r"pruning\.scorer\.recency_weight: PredictorScorer takes float or null, got 'high'"),
    (["pruning=norm", "pruning.scorer._target_=sdtp_test_scorers.NeedsArgument", "+pruning.scorer.strength=null"],
     r"pruning\.scorer\.strength: NeedsArgument takes float, got None"),
])
def test_scorer_arguments_are_checked_at_composition(overrides, message, user_scorers):
    """A misspelt scorer argument fails before the run directory exists, not when the scorer is built."""
    with pytest.raises(ConfigError, match=message):
        compose("eval", ["model=tiny-llama", *overrides])


@pytest.fixture
def user_scorers(monkeypatch):
    """A user's scorer module, importable by name as Hydra's ``_target_`` imports it (no PYTHONPATH needed)."""
    module = types.ModuleType("sdtp_test_scorers")
    module.NeedsArgument = NeedsArgument
    monkeypatch.setitem(sys.modules, "sdtp_test_scorers", module)


class NeedsArgument(Scorer):
    """A scorer whose constructor has a required argument (for the composition check above)."""

    def __init__(self, strength: float) -> None:
        self.strength = strength


def test_scorer_arguments_that_exist_compose(user_scorers):
    for overrides in (["pruning=lazyllm", "pruning.scorer.num_queries=4"], ["pruning=random", "pruning.scorer.seed=3"],
                      ["pruning=norm", "pruning.scorer._target_=sdtp_test_scorers.NeedsArgument",
                       "+pruning.scorer.strength=2"],  # an int is a float
                      ["pruning=sdtp", "pruning.scorer.path=results/predictors/smollm2-135m",
                       "pruning.scorer.recency_weight=null"]):
        compose("eval", ["model=tiny-llama", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["+kv.score._target_=sdtp.kv.scores.AccumulatedAttention"], r"kv\.method: 'h2o' names a built-in policy"),
    (["kv.method=mine", "+kv.score._target_=my_kv.nope.Score"],
     r"kv\.score\._target_: cannot import 'my_kv\.nope\.Score' \(ModuleNotFoundError.*PYTHONPATH"),
    (["kv.method=mine", "+kv.score._target_=torch.nn.Linear"],
     r"kv\.score\._target_: 'torch\.nn\.Linear' is not a subclass of sdtp\.kv\.scores\.KVScore"),
    (["kv.method=mine", "+kv.score.window=3"], r"kv\.score\._target_: missing"),
    (["kv.method=mine"], r"kv\.method: 'mine' not in .*kv\.score\._target_"),
])
def test_kv_score_target_is_checked_at_composition(overrides, message):
    """A KV policy of your own (``kv.score``) fails when the config is composed, before a model loads."""
    with pytest.raises(ConfigError, match=message):
        compose("generate", ["model=tiny-llama", "kv=h2o", *overrides])


@pytest.mark.parametrize(("overrides", "named"), [
    (["kv=none", "kv.ratio=0.3"], "kv.ratio=0.3"),
    (["pruning=none", "pruning.keep_ratio=0.1"], "pruning.keep_ratio=0.1"),
])
def test_ignored_overrides_warn(overrides, named, caplog):
    with caplog.at_level(logging.WARNING, logger="sdtp.config"):
        compose("generate", ["model=tiny-llama", *overrides])
    assert any("override ignored" in r.message and named in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sdtp.config"):
        compose("generate", ["model=tiny-llama", "pruning=random", "pruning.keep_ratio=0.5", "kv=h2o", "kv.ratio=0.3"])
    assert not any("override ignored" in r.message for r in caplog.records)


@pytest.mark.parametrize("prefix", ["+", "++"])
def test_a_misspelt_added_pruning_key_is_refused(prefix):
    """``++`` (force-add) adds a key as ``+`` does: a typo must not run as the plain pruner."""
    with pytest.raises(ConfigError, match=rf"pruning\.reviv: not a pruning option; \+{{{len(prefix)}}} adds one of"):
        compose("eval", ["model=tiny-llama", "pruning=random", f"{prefix}pruning.reviv=true"])


def test_force_add_still_sets_pruning_keys_that_exist():
    from sdtp.config import pruner_variant
    from sdtp.engine.revival import RevivingPruner

    cfg = compose("eval", ["model=tiny-llama", "pruning=random", "++pruning.keep_ratio=0.5", "++pruning.revive=true",
                           "++pruning.layers=[2]"])
    assert cfg.pruning.keep_ratio == 0.5 and list(cfg.pruning.layers) == [2]
    assert pruner_variant(cfg.pruning)[0] is RevivingPruner


# --- sdtp-generate ---------------------------------------------------------------------------------

def _gen(*overrides):
    return compose("generate", ["model=tiny-llama", *overrides])


@pytest.mark.parametrize(("overrides", "message"), [
    (["prompt=''"], r"prompt: the prompt is empty"),
    (["prompt='   '"], r"prompt: the prompt is empty"),
    (["prompt=123"], r"prompt: expected text, got 123 \(int\).*prompt_file=-"),
    (["prompt=[a,b]"], r"prompt: expected text"),
    (["max_new_tokens=0"], r"max_new_tokens: must be an integer >= 1, got 0"),
    (["max_new_tokens=-3"], r"max_new_tokens: must be an integer >= 1"),
    (["max_new_tokens=abc"], r"max_new_tokens"),
    (["prompt_file=/nonexistent/doc.txt"], r"prompt_file: cannot read /nonexistent/doc.txt"),
    (["chat_template=maybe"], r"chat_template: must be true or false, got 'maybe'"),
    (["do_sample=true", "temperature=-1"], r"temperature: must be > 0, got -1"),
    (["top_p=2.0"], r"top_p: must be in \(0, 1\], got 2\.0"),
    (["top_k=-1"], r"top_k: must be >= 0"),
    (["threads=0"], r"threads: 0 must be a positive integer or null"),
    (["threads=-1"], r"threads: -1 must be"),
    (["pruning=_schedule"], r"pruning: the group option is not a pruning method"),
])
def test_generate_rejects_bad_settings_before_loading(overrides, message, monkeypatch):
    monkeypatch.setattr(generate, "load_model", _no_model)
    with pytest.raises(ConfigError, match=message):
        generate.run(_gen(*overrides))


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded for bad input")


def test_generate_prompt_file_checks_and_stdin(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_model", _no_model)
    (tmp_path / "latin1.txt").write_bytes("line one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"prompt_file: .*latin1.txt line 2 is not UTF-8"):
        generate.run(_gen(f"prompt_file={tmp_path / 'latin1.txt'}"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"prompt_file \(.*empty.txt\): the prompt is empty"):
        generate.run(_gen(f"prompt_file={tmp_path / 'empty.txt'}"))
    monkeypatch.undo()
    # prompt_file=- reads stdin: text with =, quotes and newlines that Hydra's grammar cannot take.
    text = 'He said "a=b"\nand left.'
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    summary = generate.run(_gen("prompt_file=-", "max_new_tokens=2"))
    assert summary["prompt_tokens"] == len(text.encode()) and summary["new_tokens"] == 2


def test_generate_refuses_a_prompt_longer_than_the_model(tmp_path):
    (tmp_path / "long.txt").write_text("x" * 5000)  # byte tokenizer: 5000 tokens > tiny-llama's 4096
    with pytest.raises(ConfigError, match=r"prompt_file=.*long.txt: 5000 prompt tokens \+ max_new_tokens=32 exceed "
                                          r"model.max_length=4096"):
        generate.run(_gen(f"prompt_file={tmp_path / 'long.txt'}"))


@pytest.mark.parametrize("arg", ['prompt=a=b', 'prompt=He said "hi"', "prompt=it's", "prompt=line1\nline2",
                                 "prompt=x, y"])
def test_unparseable_prompt_argument_points_to_prompt_file(arg):
    problem = generate.prompt_argument_problem([arg])
    assert problem and problem.startswith("prompt:") and "prompt_file=-" in problem
    assert generate.prompt_argument_problem(["prompt=The capital of France is"]) is None
    assert generate.prompt_argument_problem(["-m", "prompt=x,y"]) is None  # a deliberate sweep


def test_generate_cli_hint_for_grammar_errors():
    proc = subprocess.run([sys.executable, "-m", "sdtp.cli.generate", "model=tiny-llama", "prompt=a=b"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 2 and "prompt_file=-" in proc.stderr


# --- eval data files -------------------------------------------------------------------------------

def _longbench_cfg(tmp_path, *extra):
    return compose("eval", ["eval=longbench", "model=tiny-llama", f"eval.data_dir={tmp_path}", *extra])


ROW = {"input": "", "context": "some news", "answers": ["a summary"], "length": 2, "all_classes": None, "_id": "x"}


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"multi_news.jsonl holds no records \(empty file\)"),
    (b"\n  \n", r"holds no records"),
    (json.dumps(ROW).encode() + b"\n" + json.dumps(ROW).encode()[:30] + b"\n", r"line 2 is not valid JSON"),
    (b"[1, 2]\n", r"line 1 is a JSON list, expected an object"),
    (json.dumps({**ROW, "context": "caf\xe9"}).replace("\\u00e9", "\xe9").encode("latin-1"), r"line 1 is not UTF-8"),
    (json.dumps({k: v for k, v in ROW.items() if k != "answers"}).encode(), r"line 1 lacks \['answers'\]"),
    (json.dumps({k: v for k, v in ROW.items() if k != "context"}).encode(), r"line 1 lacks \['context'\]"),
    (json.dumps({**ROW, "answers": "a summary"}).encode(), r"'answers' must be a non-empty list of strings"),
    (json.dumps({**ROW, "answers": []}).encode(), r"'answers' must be a non-empty list"),
])
def test_bad_longbench_files_fail_before_loading_naming_file_and_line(tmp_path, content, message):
    (tmp_path / "multi_news.jsonl").write_bytes(content)
    with pytest.raises(ConfigError, match=r"eval\.data_files\.multi_news: .*" + message):
        longbench.validate(_longbench_cfg(tmp_path))


def test_data_files_override_works_without_plus(tmp_path):
    path = tmp_path / "elsewhere.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    cfg = _longbench_cfg(tmp_path / "missing", f"eval.data_files.multi_news={path}")
    assert longbench.validate(cfg) == {"multi_news": path}
    cfg = _longbench_cfg(tmp_path, "+eval.data_files.nope=/x.jsonl")
    with pytest.raises(ConfigError, match=r"eval\.data_files: \['nope'\]"):
        longbench.validate(cfg)


def test_empty_perplexity_file_is_refused(tmp_path):
    (tmp_path / "wiki.raw").write_text("\n \n")
    cfg = compose("eval", ["eval=perplexity", "model=tiny-llama", f"eval.data_file={tmp_path / 'wiki.raw'}"])
    with pytest.raises(ConfigError, match=r"eval\.data_file: .*wiki.raw is empty"):
        perplexity.validate(cfg)
    (tmp_path / "wiki.raw").write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(ConfigError, match=r"eval\.data_file: .*line 2 is not UTF-8"):
        perplexity.validate(cfg)


def test_synthetic_source_without_paragraphs_is_refused(tmp_path):
    (tmp_path / "wiki.raw").write_text(" = Title = \n short line \n")
    cfg = compose("eval", ["eval=needle", "model=tiny-llama", f"eval.source={tmp_path / 'wiki.raw'}",
                           "eval.lengths=[512]"])
    with pytest.raises(ConfigError, match=r"eval\.source: .*no body paragraph"):
        synthetic.validate(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("eval.limit=0", r"eval\.limit: must be >= 1, got 0"),
    ("eval.limit=0.5", r"eval\.limit: expected an integer, got 0\.5"),
    ("eval.chat_template=maybe", r"eval\.chat_template: 'maybe' is not one of auto, true, false"),
])
def test_generation_evals_check_limit_and_chat_template_before_loading(override, message):
    cfg = compose("eval", ["eval=needle", "model=tiny-llama", "eval.lengths=[512]", override])
    with pytest.raises(ConfigError, match=message):
        synthetic.validate(cfg)
    with pytest.raises(ConfigError, match=message):
        longbench.validate(compose("eval", ["eval=longbench", "model=tiny-llama", override]))


def test_bad_offline_lm_eval_file_is_refused(tmp_path):
    (tmp_path / "copa.jsonl").write_text('{"premise": "x"}\n{"premise": \n')
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", f"eval.data_root={tmp_path}", "eval.tasks=[sdtp_copa]"])
    with pytest.raises(ConfigError, match=r"eval\.data_root \(sdtp_copa\): .*copa.jsonl line 2 is not valid JSON"):
        harness.validate(cfg)


# --- hygiene ---------------------------------------------------------------------------------------

def test_offline_by_default_respects_the_user(monkeypatch):
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert offline_by_default() == ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"]
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.is_offline_mode()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert offline_by_default() == [] and not constants.is_offline_mode()  # an online user's choice stands


# --- settings each entry point checks before its model loads ------------------------------------------

def test_an_unknown_lm_eval_task_is_refused_before_loading():
    cfg = compose("eval", ["eval=lm_eval", "model=tiny-llama", "eval.tasks=[sdtp_piqa,sdtp_bogus]"])
    with pytest.raises(ConfigError, match=r"eval\.tasks: sdtp_bogus is not an lm-eval task, group or tag \(offline "
                                          r"tasks: .*sdtp_piqa"):
        harness.validate(cfg)


# Training settings that passed the checks and failed only once the model had loaded (or never).
NO_TERMS = r"train\.loss: no term has a weight > 0"
BAD_TRAINING = [
    (["train.optimizer._target_=torch.optim.AdamWW"],
     r"train\.optimizer\._target_: cannot import 'torch\.optim\.AdamWW'"),
    (["train.optimizer._target_=torch.nn.Linear"],
     r"train\.optimizer\._target_: 'torch\.nn\.Linear' is not a subclass"),
    (["train.optimizer._partial_=false"], r"train\.optimizer\._partial_: must be true"),
    (["+train.optimizer.betaz=[0.9,0.99]"], r"train\.optimizer\.betaz: AdamW takes no such argument"),
    (["train.optimizer.lr=abc"], r"train\.optimizer\.lr: expected a number, got 'abc'"),
    (["train.scheduler._target_=torch.optim.lr_scheduler.Nope"], r"train\.scheduler\._target_: cannot import"),
    (["train.scheduler.T_max=abc"], r"train\.scheduler\.T_max: CosineAnnealingLR takes int, got 'abc'"),
    (["train.grad_clip=abc"], r"train\.grad_clip: expected a number, got 'abc'"),
    (["train.grad_clip=0"], r"train\.grad_clip: must be > 0, got 0"),
    (["train.grad_clip=null"], r"train\.grad_clip: expected a number, got None"),
    (["train.hidden_ratio=-1"], r"train\.hidden_ratio: must be > 0, got -1"),
    (["train.hidden_ratio=abc"], r"train\.hidden_ratio: expected a number, got 'abc'"),
    (["train.loss.ce=0", "train.loss.mse=0", "train.loss.ranking=0"], NO_TERMS),
    (["train.loss.ce=0", "train.loss.stage_weights=[0,0,0]"], NO_TERMS + r" .*with stage_weights \[0, 0, 0\]"),
    (["train.init_from=/nonexistent"], r"train\.init_from: no trained predictor at /nonexistent \(expected "
                                       r"predictor\.json\)"),
]


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.max_length=7"], r"data\.max_length: 7 is too short"),
    (["data.continuation_length=64", "data.max_length=48"],
     r"data\.continuation_length: must be in \(0, data\.max_length\)"),
    (["train.optimizer.lr=-1"], r"train\.optimizer\.lr: must be >= 0, got -1"),
    (["train.batch_size=abc"], r"train\.batch_size: expected a number, got 'abc'"),
    (["train.max_steps=2.7"], r"train\.max_steps: expected an integer, got 2\.7"),
    (["train.val_sequences=0"], r"train\.val_sequences: must be >= 1, got 0"),
    (["train.loss.stage_weights=[1,1]"], r"train\.loss\.stage_weights: expected \d+ weights >= 0 \(one per stage\)"),
    (["seed=-1"], r"seed: must be in \[0, 2\*\*32\), got -1"),
    (["+pruning.reviv=true"], r"pruning\.reviv: not a pruning option; \+ adds one of \['merge_weight', 'refill'"),
    *BAD_TRAINING,
])
def test_training_settings_are_checked_before_loading(overrides, message):
    from sdtp.cli.train import validate_train_config

    with pytest.raises(ConfigError, match=message):
        validate_train_config(compose("train", ["model=tiny-llama", *overrides]))


@pytest.mark.parametrize(("overrides", "message"), BAD_TRAINING)
def test_bad_training_settings_fail_before_the_model_loads(overrides, message, monkeypatch, tmp_path):
    """Through ``sdtp-train``'s entry point: these failed after the model had loaded (Hydra's InstantiationException,
    a bare ValueError, a RuntimeError from ``backward()``), named the wrong key, or were accepted."""
    from sdtp.cli import train
    from sdtp.training import loop

    monkeypatch.setattr(loop, "load_model", _no_model)
    with pytest.raises(ConfigError, match=message):
        train.run(compose("train", ["model=tiny-llama", f"out_dir={tmp_path}", *overrides]))


def test_the_training_defaults_and_ablations_pass_the_new_checks(tmp_path):
    """The checks above refuse only bad values: the defaults, the paper's ablations (some weights 0), no scheduler,
    another optimizer and a warm start from a predictor folder all validate."""
    from sdtp.cli.train import validate_train_config
    from sdtp.predictor import PredictorMeta, TokenPredictor

    meta = PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4)
    TokenPredictor(meta).save(tmp_path)
    for overrides in ([], ["experiment=sdtp_wo_rank"], ["experiment=sdtp_wo_rank_mse"], ["train.scheduler=null"],
                      ["train.optimizer._target_=torch.optim.SGD", "train.optimizer.lr=0"],
                      ["train.loss.ce=0", "train.loss.mse=0", "train.loss.ranking=0", "train.loss.selection=1"],
                      ["train.loss.ce=0", "train.loss.stage_weights=[0,0,1]"], [f"train.init_from={tmp_path}"]):
        validate_train_config(compose("train", ["model=tiny-llama", *overrides]))


@pytest.mark.parametrize("overrides", [["model=smollm2-135m"], ["experiment=paper_table2"]])
def test_the_documented_bench_commands_validate(overrides):
    """`sdtp-bench model=smollm2-135m` (README) and `make paper-table2`: 1K..8K prompts + 128 new tokens."""
    from sdtp.cli.bench import validate_bench

    cfg = compose("bench", overrides)
    assert max(cfg.lengths) == int(cfg.model.max_length) == 8192
    validate_bench(cfg)


def test_bench_prompts_must_fit_the_model():
    from sdtp.cli.bench import validate_bench

    limit = int(compose("bench", ["model=tiny-llama", "pruning=random"]).model.max_length)
    validate_bench(compose("bench", ["model=tiny-llama", "pruning=random", f"lengths=[{limit}]", "new_tokens=16"]))
    cfg = compose("bench", ["model=tiny-llama", "pruning=random", f"lengths=[{limit + 1}]"])
    with pytest.raises(ConfigError, match=rf"lengths: {limit + 1} prompt tokens exceed model\.max_length={limit}"):
        validate_bench(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (["stages=[genrate]"], r"stages: \['genrate'\] not in \['generate', 'eval', 'bench'\]"),
    (['bench=["lengths=[100000]"]'], r"lengths: 100000 prompt tokens"),
    (['evals.perplexity=["eval=perplexity","eval.stride=0"]'], r"eval\.stride"),
    (["generation.max_new_tokens=0"], r"generation\.max_new_tokens: must be >= 1, got 0"),
    (["generation.prompt_tokens=100000"], r"generation\.prompt_tokens: 100000 exceeds model\.max_length"),
])
def test_pipeline_checks_every_stage_before_the_first(overrides, message):
    """A mistake in the last stage's overrides fails before the first stage runs (no model is loaded)."""
    from sdtp.cli.pipeline import validate_pipeline

    cfg = compose("pipeline", ["model=tiny-llama", "variants=[none,random]", "bench_variant=random", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_pipeline(cfg)


@pytest.mark.parametrize(("model", "message"), [
    ({"hf_id": "/nonexistent/weights"}, r"model\.hf_id: /nonexistent/weights is not a folder"),
    ({"hf_id": "someone/not-downloaded-model"}, r"model\.hf_id: someone/not-downloaded-model is not in the Hugging "
                                                r"Face cache and the hub is offline"),
])
def test_a_hub_model_that_cannot_be_found_is_named(model, message, monkeypatch):
    from huggingface_hub import constants

    from sdtp.models import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match=message):
        load_model({"family": "llama", "source": "hub", "device": "cpu", **model})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the check is for machines without CUDA")
def test_cuda_without_a_gpu_fails_before_the_weights_load():
    from sdtp.models import load_model

    with pytest.raises(ConfigError, match=r"model\.device=cuda: no CUDA device is available .* use model\.device=cpu"):
        load_model(compose("generate", ["model=tiny-llama", "model.device=cuda"]).model)


@pytest.mark.parametrize(("config", "message"), [
    ("llama", r"model\.num_layers: config says 30, the model has 2"),
    ("gpt2", r"model\.family: architecture 'gpt2' is not supported"),
    ("qwen2", r"model\.family: the config says 'llama', but the model is a 'qwen2'"),
])
def test_a_local_model_is_checked_from_its_config_before_its_weights(tmp_path, config, message):
    """The folder holds only config.json: loading weights would fail differently, so the check came first."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    from sdtp.models import load_model

    configs = {"llama": LlamaConfig(num_hidden_layers=2), "gpt2": GPT2Config(), "qwen2": Qwen2Config(num_hidden_layers=30)}
    configs[config].save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_model({"family": "llama", "source": "hub", "hf_id": str(tmp_path), "device": "cpu", "num_layers": 30})
