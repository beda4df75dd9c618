"""Rows over several training seeds (sdtp/reports/seed_runs.py): per-document means, majority answers, groups,
intervals over seeds, and the scripts' list of seed predictors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sdtp.reports.seed_runs import merge_seed_runs, over_seeds, seed_groups, seed_lines, seed_mean, spread

REPO = Path(__file__).resolve().parents[1]


def _lm_eval(ids: list[int], acc: str, pred: str) -> dict:
    return {"metrics": {"model": "tiny"},
            "documents": {"t": {"doc_ids": ids, "acc": acc, "pred": pred, "target": [0] * len(ids), "choices": 3}}}


def test_seed_mean_of_lm_eval_runs_averages_correctness_and_takes_the_majority_answer():
    runs = [_lm_eval([0, 1, 2], "101", "012"), _lm_eval([0, 1, 2, 3], "0011", "2122"), _lm_eval([0, 1, 2], "111", "212")]
    mean = seed_mean(runs)
    docs = mean["documents"]["t"]
    assert docs["doc_ids"] == [0, 1, 2]  # only the documents every seed evaluated
    assert docs["acc"] == pytest.approx([2 / 3, 1 / 3, 1.0])
    # doc 0: answers 0, 2, 2 -> 2; doc 1: 1, 1, 1 -> 1; doc 2: 2, 2, 2 -> 2
    assert docs["pred"] == "212" and mean["metrics"]["seeds"] == 3
    tie = seed_mean([_lm_eval([0], "1", "0"), _lm_eval([0], "0", "1")])["documents"]["t"]
    assert tie["pred"] == "0"  # a tie goes to the row's own run (the first)
    assert seed_mean([_lm_eval([0], "1", "0"), _lm_eval([0], "1", None)])["documents"]["t"]["pred"] is None


def test_seed_mean_of_generation_runs_averages_scores_and_keeps_the_first_costs():
    def run(scores: dict[str, float], prefill: float) -> dict:
        return {"metrics": {}, "documents": {},
                "predictions": [{"id": i, "dataset": "multi_news", "score": s, "prefill_s": prefill} for i, s in scores.items()]
                + [{"id": "x", "dataset": "multi_news", "score": None}]}

    mean = seed_mean([run({"a": 0.2, "b": 0.4}, 1.0), run({"a": 0.4, "b": 0.0, "c": 1.0}, 2.0)])
    assert [(p["id"], p["score"], p["prefill_s"]) for p in mean["predictions"]] == [("a", pytest.approx(0.3), 1.0),
                                                                                   ("b", pytest.approx(0.2), 1.0)]


def test_groups_put_the_rows_own_run_first_and_need_it():
    runs = {"dense": _lm_eval([0], "1", "0"), "sdtp": _lm_eval([0], "1", "0"), "sdtp@seed10": _lm_eval([0], "0", "1"),
            "sdtp@seed9": _lm_eval([0], "0", "1")}
    merged, groups = merge_seed_runs(runs)
    assert groups == {"sdtp": ["sdtp", "sdtp@seed9", "sdtp@seed10"]} and set(merged) == {"dense", "sdtp"}
    assert merged["sdtp"]["documents"]["t"]["acc"] == pytest.approx([1 / 3]) and merged["dense"] is runs["dense"]
    with pytest.raises(ValueError, match="has no run 'sdtp_h2o'"):
        seed_groups(["dense", "sdtp_h2o@seed9"])


def test_interval_over_seeds_and_its_table():
    one = over_seeds([48.0])
    assert one["mean"] == 48.0 and one["low"] is None and one["high"] is None
    three = over_seeds([47.0, 48.0, 49.0])  # sd 1, t_{0.975, 2} = 4.303
    assert (three["low"], three["high"]) == pytest.approx((48 - 4.3027 / 3**0.5, 48 + 4.3027 / 3**0.5), abs=1e-3)
    s = spread({"sdtp": {"Avg": 47.0, "CB": None}, "sdtp@seed9": {"Avg": 48.0, "CB": 50.0},
                "sdtp@seed10": {"Avg": 49.0, "CB": 40.0}})
    assert list(s["columns"]) == ["Avg"]  # a number some seed lacks is left out
    lines = seed_lines({"sdtp": s}, {"sdtp": "SDTP"})
    assert lines[0].startswith("| row | number | shipped | seed9 | seed10 |")
    assert lines[2] == "| SDTP | Avg | 47.00 | 48.00 | 49.00 | 48.00 [45.52, 50.48] |"
    mixed = seed_lines({"a": s, "b": spread({"b": {"Avg": 1.0}, "b@s2": {"Avg": 2.0}})}, {})
    assert mixed[0].startswith("| row | number | seed 1 | seed 2 | seed 3 |") and mixed[-1].startswith("| b (shipped, s2) | Avg | 1.00 | 2.00 |  |")


@pytest.mark.parametrize("env, expected", [
    ({}, ["results/predictors/m-news/seed9", "results/predictors/m-news/seed10"]),  # the shipped folder's list
    ({"SEED_PREDICTORS": ""}, []),  # the shipped predictor alone
    ({"SEED_PREDICTORS": "a/s1 b/s2"}, ["a/s1", "b/s2"]),
])
def test_scripts_read_the_seed_predictors_from_the_shipped_folder(tmp_path, env, expected):
    (tmp_path / "results" / "predictors" / "m").mkdir(parents=True)
    (tmp_path / "results" / "predictors" / "m" / "seeds.txt").write_text(
        "# comment\nresults/predictors/m-news/seed9\n\nresults/predictors/m-news/seed10\n")
    script = f"PY=true MODEL=m; source {REPO}/experiments/lib/lm_eval_runs.sh; seed_predictors"
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == expected


def test_a_seed_predictor_folder_without_a_predictor_stops_the_script_before_any_run(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "predictor.json").write_text("{}")
    script = (f"set -euo pipefail; PY=true MODEL=m; source {REPO}/experiments/lib/lm_eval_runs.sh; "
              "load_seed_predictors; echo ran ${seed_dirs[*]}")
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SEED_PREDICTORS": "a"},
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ran a"
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SEED_PREDICTORS": "a b"},
                         capture_output=True, text=True)
    assert run.returncode == 1 and "ran" not in run.stdout and "b holds no predictor.json" in run.stderr


@pytest.mark.parametrize("model, min_seeds", [("smollm2-135m", 2), ("gemma3-270m", 1)])
def test_the_shipped_predictors_seeds_exist(model, min_seeds):
    """Every folder a shipped predictor's ``seeds.txt`` lists holds a checkpoint for that model's schedule."""
    shipped = json.loads((REPO / "results" / "predictors" / model / "predictor.json").read_text())
    listed = (REPO / "results" / "predictors" / model / "seeds.txt").read_text().splitlines()
    folders = [REPO / line for line in listed if line.strip() and not line.startswith("#")]
    assert len(folders) >= min_seeds and all((f / "predictor.safetensors").is_file() for f in folders)
    for folder in folders:
        meta = json.loads((folder / "predictor.json").read_text())
        assert (meta["base_model"], meta["layers"]) == (shipped["base_model"], shipped["layers"])
