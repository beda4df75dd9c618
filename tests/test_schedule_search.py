"""The schedule search (experiment=schedule_search): config, objective, depth-aware stage counts, Pareto front,
and a tiny end-to-end Optuna sweep on a random model whose invalid schedules fail without stopping it."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from sdtp.config import CONF_DIR, REPO_ROOT, validate_config
from sdtp.errors import ConfigError
from sdtp.flops import prefill_fraction
from sdtp.reports import schedule_search as page
from sdtp.search.objective import objective_values
from sdtp.search.pareto import pareto_front
from sdtp.search.space import max_stages, suggest_num_stages


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("eval", ["experiment=schedule_search", *overrides], return_hydra_config=True)


def test_sweep_config_composes_and_validates():
    cfg = _compose()
    validate_config(cfg)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.sampler._target_.endswith("NSGAIISampler")
    assert list(sweeper.direction) == ["minimize", "minimize"] and sweeper.max_failure_rate == 1.0
    assert sweeper.params["pruning.first_layer"] == "int(interval(1, 10))"  # resolved for 30 layers
    assert sweeper.params["pruning.layer_step"] == "int(interval(1, 4))"
    assert cfg.eval.name == "continuation" and cfg.eval.data_file.endswith("wiki.valid.raw")
    assert cfg.pruning.name == "lazyllm" and list(cfg.objective) == ["results.nll", "results.flops.fraction"]
    # The fixed point: the model's default schedule at r = 0.9 (smollm2-135m: 2, 5, ..., 29).
    assert (cfg.pruning.first_layer, cfg.pruning.layer_step, cfg.pruning.num_stages, cfg.pruning.keep_ratio) == \
        (2, 3, 10, 0.9)


def test_objective_reads_the_named_metrics():
    metrics = {"results": {"nll": 2.5, "flops": {"fraction": 0.6}}}
    assert objective_values(metrics, None) is None
    assert objective_values(metrics, "results.nll") == 2.5
    assert objective_values(metrics, ["results.nll", "results.flops.fraction"]) == [2.5, 0.6]
    with pytest.raises(ConfigError, match=r"objective\[1\]: 'results.flops.total'"):
        objective_values(metrics, ["results.nll", "results.flops.total"])
    with pytest.raises(ConfigError, match="not a finite number"):
        objective_values({"results": {"nll": float("nan")}}, "results.nll")


class FakeTrial(SimpleNamespace):
    def suggest_int(self, name, low, high):
        self.params[name] = (low, high)


def test_stage_count_stays_within_the_depth():
    assert max_stages(2, 3, 30) == 10 and max_stages(1, 1, 4) == 3 and max_stages(10, 4, 30) == 5
    assert max_stages(30, 1, 30) == 0  # the first stage itself is out of range
    cfg = _compose()
    trial = FakeTrial(params={"pruning.first_layer": 10, "pruning.layer_step": 4}, user_attrs={})
    suggest_num_stages(cfg, trial)
    assert trial.params["pruning.num_stages"] == (1, 5)  # 10, 14, 18, 22, 26
    trial = FakeTrial(params={"pruning.first_layer": 1}, user_attrs={"pruning.layer_step": "1"})
    suggest_num_stages(cfg, trial)
    assert trial.params["pruning.num_stages"] == (1, 12)  # capped by search.max_stages
    trial = FakeTrial(params={}, user_attrs={"pruning.num_stages": "3"})
    suggest_num_stages(cfg, trial)
    assert trial.params == {}  # fixed on the command line: nothing drawn


@pytest.mark.parametrize("swept", ["choice(2, 3)", "int(interval(1, 6))"])
def test_stage_count_swept_on_the_command_line_is_kept(swept):
    """``pruning.num_stages=choice(2, 3)`` on the search's command line: the sweeper draws it first; drawing it again
    as an int range raised Optuna's ValueError outside any trial and stopped the sweep."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    override = OverridesParser.create().parse_override(f"pruning.num_stages={swept}")
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    trial._suggest("pruning.num_stages", create_optuna_distribution_from_override(override))
    drawn = trial.params["pruning.num_stages"]
    suggest_num_stages(_compose("model=tiny-llama"), trial)  # as the sweeper calls it (custom_search_space)
    assert trial.params == {"pruning.num_stages": drawn}


@pytest.mark.parametrize("method", ["gemfilter", "fastkv"])
def test_search_refuses_methods_with_explicit_layers(method, tmp_path):
    """Their pruning.layers replace the drawn first_layer / layer_step / num_stages: every trial would prune at one
    layer, labelled with its draws. The sweep's hook, each trial's composition, the fixed points' validation and
    the script all refuse, before any trial or run."""
    from sdtp.cli.evaluate import validate_eval

    text = tmp_path / "wiki.valid.raw"  # the data the checks need, without the offline mirror
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 40)
    cfg = _compose("model=tiny-llama", f"pruning={method}", f"eval.data_file={text}")
    trial = FakeTrial(params={"pruning.first_layer": 1, "pruning.layer_step": 1}, user_attrs={})
    with pytest.raises(ConfigError, match=rf"pruning\.layers: pruning={method} sets explicit stage layers \[\d\]"):
        suggest_num_stages(cfg, trial)
    with pytest.raises(ConfigError, match=r"pruning\.first_layer, pruning\.layer_step: set on the command line"):
        validate_config(cfg, ["pruning.first_layer=1", "pruning.layer_step=1"])
    with pytest.raises(ConfigError, match=r"pruning\.layers: .*cannot vary"):
        validate_eval(cfg)
    validate_eval(_compose("model=tiny-llama", f"pruning={method}", "pruning.layers=null", f"eval.data_file={text}"))
    validate_eval(_compose("model=tiny-llama", "pruning=none", f"eval.data_file={text}"))  # the dense fixed point
    guard = tmp_path / "python"  # a Python that refuses to start a real run: the check must stop the script first
    guard.write_text(f'#!/usr/bin/env bash\ncase "$2" in sdtp.cli.evaluate|sdtp.reports.schedule_search)\n'
                     f'  echo "reached $2" >&2; exit 42;;\nesac\nexec {sys.executable} "$@"\n')
    guard.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHON": str(guard), "RUN": str(tmp_path / "run"),
           "OUT": str(tmp_path / "out"), "MODEL": "tiny-llama", "PRUNING": method, "SMOKE": "1",
           "EVAL_ARGS": f"eval.data_file={text} eval.context_len=96 eval.cont_len=16 eval.num_segments=2"}
    proc = subprocess.run(["bash", "experiments/schedule_search.sh"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "reached" not in proc.stderr, proc.stderr[-3000:]
    assert "check failed: sdtp-eval" in proc.stderr and "cannot vary" in proc.stderr


def test_a_refused_search_leaves_no_trial_in_the_stored_study(tmp_path):
    """Optuna's sweeper asks the study for a trial before calling the search-space hook, so a refusal there (explicit
    pruning.layers) stopped the sweep with that trial RUNNING in the stored study for good. The search's sweeper
    refuses before the study holds any trial."""
    import hydra.utils

    storage = f"sqlite:///{tmp_path}/optuna.db"
    cfg = _compose("model=tiny-llama", "pruning=gemfilter", f"hydra.sweeper.storage={storage}")
    sweeper = hydra.utils.instantiate(cfg.hydra.sweeper)
    # What setup() stores; the launcher and context it also sets up are never reached by a refused sweep.
    sweeper.sweeper.config, sweeper.sweeper.hydra_context, sweeper.sweeper.launcher = cfg, object(), object()
    with pytest.raises(ConfigError, match=r"pruning\.layers: pruning=gemfilter sets explicit stage layers"):
        sweeper.sweep([])
    assert page.study_states(storage) == {}

def _nsga_session(storage: str, seed: int, trials: int) -> list[tuple]:
    """``trials`` schedules drawn as the Optuna sweeper draws them (ask, suggest, tell) by an NSGA-II sampler seeded
    ``seed`` on the stored study, for a 30-layer model."""
    import optuna
    from optuna.distributions import CategoricalDistribution, IntUniformDistribution

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = {"pruning.first_layer": IntUniformDistribution(1, 10), "pruning.layer_step": IntUniformDistribution(1, 4),
             "pruning.keep_ratio": CategoricalDistribution([0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])}
    cfg = _compose()
    study = optuna.create_study(study_name=page.STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(seed=seed, population_size=8),
                                load_if_exists=True)
    drawn = []
    for _ in range(trials):
        trial = study.ask()
        for name, distribution in space.items():
            trial._suggest(name, distribution)
        suggest_num_stages(cfg, trial)
        key = tuple(trial.params[f"pruning.{k}"] for k in ("first_layer", "layer_step", "num_stages", "keep_ratio"))
        study.tell(trial, values=[float(sum(key[:3])), float(key[3])])
        drawn.append(key)
    return drawn


def test_a_resumed_search_does_not_redraw_the_killed_one(tmp_path):
    """The script resumes a killed search with a new sampler on the stored study; seeded as the killed one (0), it
    drew the same schedules again (all of NSGA-II's first generation). Seeded 0 + the stored trials, it does not."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert page.sampler_seed(storage) == page.config_sampler_seed() == _compose().hydra.sweeper.sampler.seed == 0
    first = _nsga_session(storage, page.sampler_seed(storage), 3)  # killed after 3 trials
    assert page.stored_trials(storage) == 3 and page.sampler_seed(storage) == 3 and page.sampler_seed(storage, 5) == 8
    resumed = _nsga_session(storage, page.sampler_seed(storage), 3)
    assert resumed != first and not set(resumed) & set(first), (first, resumed)


@pytest.mark.slow  # ~75 s: the script twice (the seed rule alone: test_a_resumed_search_does_not_redraw_the_killed_one)
def test_the_script_seeds_a_resumed_sweep_past_the_stored_trials(tmp_path):
    """experiments/schedule_search.sh passes hydra.sweeper.sampler.seed=<base + stored trials> to the sweep (here a
    study with 3 stored trials: complete, failed, interrupted), after the arguments, so it is the one Hydra takes."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    (tmp_path / "run").mkdir()
    storage = f"sqlite:///{tmp_path}/run/optuna.db"
    study = optuna.create_study(study_name=page.STUDY_NAME, storage=storage, directions=["minimize", "minimize"])
    done, failed, _ = study.ask(), study.ask(), study.ask()
    study.tell(done, values=[1.0, 1.0])
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    text = tmp_path / "wiki.valid.raw"
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 40)
    calls = tmp_path / "calls.txt"
    guard = tmp_path / "python"  # records the sdtp-eval commands instead of running them; renders nothing
    guard.write_text(f'#!/usr/bin/env bash\ncase "$2 $3" in "sdtp.cli.evaluate "*) echo "$*" >> {calls}; exit 0;;\n'
                     f'  "sdtp.reports.schedule_search render") exit 0;;\nesac\nexec {sys.executable} "$@"\n')
    guard.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHON": str(guard), "RUN": str(tmp_path / "run"),
           "OUT": str(tmp_path / "out"), "MODEL": "tiny-llama", "SMOKE": "1", "N_TRIALS": "6",
           "EVAL_ARGS": f"eval.data_file={text} eval.context_len=96 eval.cont_len=16 eval.num_segments=2"}
    for args, seed in (([], 3), (["hydra.sweeper.sampler.seed=5"], 8)):
        calls.unlink(missing_ok=True)
        proc = subprocess.run(["bash", "experiments/schedule_search.sh", *args], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        sweep = [line for line in calls.read_text().splitlines() if " -m " in line]
        assert len(sweep) == 1 and "hydra.sweeper.n_trials=4" in sweep[0], sweep
        assert sweep[0].endswith(f"hydra.sweeper.sampler.seed={seed}"), sweep


def test_pareto_front_of_hand_made_points():
    points = [(2.0, 0.5), (2.1, 0.4), (2.0, 0.6), (1.9, 0.9), (2.2, 0.45), (2.1, 0.4), (1.9, 1.0)]
    # (2.0, 0.6) is dominated by (2.0, 0.5); (2.2, 0.45) by (2.1, 0.4); (1.9, 1.0) by (1.9, 0.9); equal points both stay.
    assert pareto_front(points) == [0, 1, 3, 5]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]


def test_prefill_fraction():
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
              "vocab_size": 260, "num_hidden_layers": 4}
    dense = prefill_fraction(config, 100)
    assert dense["fraction"] == 1.0 and dense["pruned_gflops"] == dense["dense_gflops"]
    assert prefill_fraction(config, 100, [100, 90, 81, 73])["fraction"] < prefill_fraction(config, 100, [100, 100, 90, 81])["fraction"] < 1.0


def _metrics(nll: float, fraction: float, schedule: tuple | None) -> dict:
    """A finished continuation run's metrics.json, as far as the page reads it."""
    keys = dict(zip(page.KEYS, schedule)) if schedule else {}
    first, step, stages = schedule[:3] if schedule else (0, 0, 0)
    return {"model": "tiny-llama", "dtype": "torch.float32", "threads": 1, "wall_s": 2.0, "git_commit": "c0ffee",
            "pruning": {"schedule": {"layers": [first + i * step for i in range(stages)]} if schedule else None},
            "results": {"nll": nll, "avg_kept_fraction": fraction, "flops": {"fraction": fraction,
                                                                             "pruned_gflops": fraction}},
            "config": {"paths": {"root": "/clone", "data_dir": "/data"}, "model": {"device": "cpu"},
                       "pruning": {"name": "lazyllm", **keys},
                       "eval": {"dataset": "wikitext", "data_file": "/data/lm/wiki.valid.raw", "context_len": 96,
                                "cont_len": 16, "num_segments": 2}}}


def test_page_marks_the_front_and_the_paper_schedule(tmp_path):
    import json

    runs = {"dense": _metrics(2.0, 1.0, None), "paper": _metrics(2.3, 0.6, (1, 1, 3, 0.9)),
            "sweep/a": _metrics(2.2, 0.5, (1, 1, 3, 0.8)), "sweep/b": _metrics(2.5, 0.4, (2, 1, 2, 0.7)),
            "sweep/c": _metrics(2.6, 0.7, (1, 2, 2, 0.9))}
    # Per-segment NLLs (two segments around each run's mean): the page pairs every point with the paper's.
    spread = {"dense": 0.0, "paper": 0.1, "sweep/a": 0.3, "sweep/b": 0.0, "sweep/c": 0.1}
    for name, metrics in runs.items():
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
        nll, d = metrics["results"]["nll"], spread[name]
        (tmp_path / name / "segments.jsonl").write_text(
            "".join(json.dumps({"id": i, "nll": v}) + "\n" for i, v in enumerate([nll - d, nll + d])))
    page.main(["render", "--sweep", str(tmp_path / "sweep"), "--paper", str(tmp_path / "paper"), "--dense",
               str(tmp_path / "dense"), "--out", str(tmp_path / "out"), "--wall-s", "1"])
    built = json.loads((tmp_path / "out" / "tiny-llama.json").read_text())
    assert [p["pareto"] for p in built["trials"]] == [True, True, False] and not built["paper"]["pareto"]
    assert built["paper_dominated_by"] == [0] and built["best_within_budget"]["keep_ratio"] == 0.8
    assert built["eval"]["data_file"] == "${paths.data_dir}/lm/wiki.valid.raw"
    # a − paper per segment: (1.9 − 2.2, 2.5 − 2.4) = (−0.3, +0.1): mean −0.1, sd √0.08, t(0.975, 1) = 12.706
    paired = built["trials"][0]["delta_vs_paper"]
    half = 12.7062 * (0.08 ** 0.5) / 2 ** 0.5
    assert paired["mean"] == pytest.approx(-0.1) and paired["n"] == 2
    assert paired["low"] == pytest.approx(-0.1 - half, abs=1e-3) and paired["high"] == pytest.approx(-0.1 + half, abs=1e-3)
    assert built["paper"]["delta_vs_paper"]["identical"]
    text = (tmp_path / "out" / "tiny-llama.md").read_text()
    assert "dominated by 1 trial(s), e.g. first 1, step 1, 3 stages, r = 0.8" in text
    assert {p.suffix for p in (tmp_path / "out").iterdir()} == {".md", ".csv", ".png", ".json"}
    with pytest.raises(SystemExit, match="built from more data"):  # a smaller search never replaces the page
        (tmp_path / "sweep" / "c" / "metrics.json").unlink()
        page.main(["render", "--sweep", str(tmp_path / "sweep"), "--paper", str(tmp_path / "paper"), "--dense",
                   str(tmp_path / "dense"), "--out", str(tmp_path / "out")])


def test_page_names_the_machines_the_runs_recorded():
    from sdtp.reports.lm_eval_pages import machine_name
    from sdtp.reports.run_summary import machine

    def point(kind: str, nll: float, flops: float) -> dict:
        return {"kind": kind, "nll": nll, "flops_fraction": flops, "wall_s": 1.0, "segments": {"0": nll}}

    recorded = {**_metrics(2.2, 0.5, (1, 1, 3, 0.8)), "machine": {"cpu_model": "Recorded CPU", "device": "cpu"}}
    built = page.build_page([point("trial", 2.2, 0.5)], point("paper", 2.3, 0.6), point("dense", 2.0, 1.0),
                            [recorded, _metrics(2.3, 0.6, (1, 1, 3, 0.9))], {}, None, "c", 1.0, "tiny-llama")
    # the run that recorded its machine keeps it; the one that did not is taken to be from the rendering host
    assert built["machine"] == ", ".join(sorted({"Recorded CPU", machine_name({"machine": machine("cpu")})}))


def test_tiny_sweep_survives_schedules_that_do_not_fit(tmp_path):
    """4 trials on tiny-llama (4 layers): a first stage at layer 4 does not fit, so those trials fail at
    composition; the others run; the sweep finishes and the study records which is which."""
    text = tmp_path / "wiki.valid.raw"
    text.write_text(" \n = Title = \n \n" + " The quick brown fox jumps over the lazy dog . \n" * 40)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "SQLALCHEMY_SILENCE_UBER_WARNING": "1"}
    sweep = subprocess.run(
        [sys.executable, "-m", "sdtp.cli.evaluate", "-m", "experiment=schedule_search", "model=tiny-llama", "threads=1",
         f"eval.data_file={text}", "eval.context_len=96", "eval.cont_len=16", "eval.num_segments=2",
         "pruning.first_layer=choice(1, 4)", f"hydra.sweep.dir={tmp_path}/sweep", f"hydra.sweeper.storage={storage}",
         "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.population_size=2"],
        env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    import optuna

    trials = optuna.load_study(study_name=page.STUDY_NAME, storage=storage).trials
    assert len(trials) == 4
    for trial in trials:  # failed exactly when the schedule does not fit
        assert (trial.state.name == "FAIL") == (trial.params["pruning.first_layer"] == 4), trial
        assert trial.state.name == "FAIL" or len(trial.values) == 2
    assert page.remaining_trials(storage, 6) == 2
