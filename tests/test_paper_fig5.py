"""Paper Figure 5 page on fabricated point summaries: stage layers from the model's default schedule, paired
intervals by hand, analytic prefill FLOPs against sdtp.flops, missing points, and too many stages refused before
any work."""

from __future__ import annotations

import json
import math

import pytest

from sdtp.flops import ModelDims, prefill_flops
from sdtp.reports import paper_fig5 as f5
from sdtp.reports.lm_eval_pages import write_page_files

T2 = 4.302652729911275  # t_{0.975, 2}
# A 30-layer model's dims (SmolLM2-135M-like), no weights needed.
CONFIG = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
          "intermediate_size": 1536, "vocab_size": 49152, "num_hidden_layers": 30}
DENSE = [2.0, 3.0, 4.0]
POINTS = {1: [2.0, 3.1, 4.0], 3: [2.1, 3.2, 4.3], 7: [2.3, 3.5, 4.4]}


def _write(d, row, segments, schedule="", seed=0, cpu="Test CPU"):
    d.mkdir(parents=True, exist_ok=True)
    setup = {"row": row, "train_steps": 60, "train_args": "", "eval_args": "e", "schedule": schedule}
    (d / (f"{row}_s{seed}.json" if row != "dense" else "dense.json")).write_text(json.dumps({
        "schema": 1, "row": row, "seed": None if row == "dense" else seed, "setup": setup, "command": "c", "wall_s": 300,
        "metrics": {"dtype": "torch.float32", "git_commit": "abc", "machine": {"cpu_model": cpu},
                    "context_len": 1000, "avg_layer_token_fraction": 0.9},
        "segments": {str(i): v for i, v in enumerate(segments)}}))


@pytest.fixture
def points_dir(tmp_path):
    d = tmp_path / "points"
    _write(d, "dense", DENSE)
    for n, nll in POINTS.items():
        _write(d, f5.row_name(n), nll, f5.schedule(f5.stage_layers(n, 2, 3, 30)))
    return d


def test_stage_layers_follow_the_default_schedule_and_refuse_too_many():
    assert f5.stage_layers(7, 2, 3, 30) == [2, 5, 8, 11, 14, 17, 20]  # SmolLM2: the shipped schedule's first 7
    assert f5.stage_layers(7, 4, 3, 32) == [4, 7, 10, 13, 16, 19, 22]  # Llama2-7B: the paper's layer 4, step 3
    with pytest.raises(ValueError, match=r"STAGES: 4 stages from layer 1 every 1 need layer 4, beyond tiny-llama's "
                                         r"depth \(4 layers: at most 3 stages\)"):
        f5.stage_layers(4, 1, 1, 4, "tiny-llama")
    with pytest.raises(ValueError, match="STAGES: 0 stages"):
        f5.stage_layers(0, 2, 3, 30)
    assert [r for r, _ in f5.plan([1, 2, 3, 4, 5, 6, 7], 2, 3, 30)] == [f"stages{s}" for s in (1, 7, 4, 2, 5, 3, 6)]
    assert f5.layers_of(f5.schedule([2, 5, 8])) == [2, 5, 8]


def test_points_cli_refuses_too_many_stages_before_any_work(capsys):
    with pytest.raises(SystemExit) as err:
        f5.main(["points", "--model", "tiny-llama", "--stages", "1 2 4"])
    assert err.value.code == 2 and "STAGES: 4 stages" in capsys.readouterr().err
    f5.main(["points", "--model", "tiny-llama", "--stages", "2"])
    assert capsys.readouterr().out.strip() == "stages2\tpruning.layers=[1,2] pruning.keep_ratio=0.9"


def test_intervals_flops_and_missing_points(points_dir):
    page = f5.build_page(points_dir, "tiny", [1, 2, 3, 4, 5, 6, 7], CONFIG)
    assert page["missing"] == [2, 4, 5, 6] and page["seq_len"] == 1000
    d = page["points"]["3"]["delta_nll"]
    diffs = [0.1, 0.2, 0.3]
    half = T2 * 0.1 / math.sqrt(3)
    assert d["mean"] == pytest.approx(0.2) and (d["low"], d["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert d["n"] == len(diffs)
    e = page["points"]["1"]
    assert e["layers"] == [2]
    # one stage before layer 2 keeping round(0.9 x 1000) = 900: layers 0, 1 see 1000 tokens, 28 layers 900
    dims = ModelDims.from_config(CONFIG)
    expected = prefill_flops(dims, [1000] * 2 + [900] * 28).total / prefill_flops(dims, [1000] * 30).total
    assert e["flops_fraction"] == pytest.approx(expected)
    assert e["layer_fraction"] == pytest.approx((2 * 1000 + 28 * 900) / 30000)
    fractions = [page["points"][s]["flops_fraction"] for s in ("1", "3", "7")]
    assert fractions == sorted(fractions, reverse=True)
    assert page["trend"]["stages"] == [7, 1] and page["trend"]["diff"]["mean"] == pytest.approx((0.3 + 0.4 + 0.4) / 3)


def test_page_files_paper_numbers_and_caveats(points_dir, tmp_path):
    page = f5.build_page(points_dir, "tiny", [1, 2, 3, 4, 5, 6, 7], CONFIG, command="bash experiments/paper_fig5.sh")
    md = write_page_files(tmp_path / "out", page, f5.render, f5.to_csv, f5.render_plot)
    text = md.read_text()
    assert "| 2 | – | – | missing | – | – | – | – | – | – |" in text
    assert "Missing points: stages2, stages4" in text
    assert "60.75" in text and "bash experiments/paper_fig5.sh" in text and "Test CPU" in text
    assert "near chance on WinoGrande" in text and "480" in text and "1000-token prompt" in text
    assert "7 − 1 stages" in text
    rows = list(__import__("csv").DictReader(f5.to_csv(page).splitlines()))
    assert len(rows) == 7 and rows[0]["paper_avg_accuracy"] == "60.19" and rows[1]["delta_nll"] == ""
    for suffix in (".json", ".csv", ".png"):
        assert (tmp_path / "out" / f"tiny{suffix}").is_file()


def test_page_without_dense_or_points(tmp_path):
    page = f5.build_page(tmp_path / "none", "tiny", [1, 2], CONFIG)
    assert page["missing"] == [1, 2] and page["dense"] is None and page["trend"] is None
    assert "Dense reference: missing" in f5.render(page)
    write_page_files(tmp_path / "out", page, f5.render, f5.to_csv, f5.render_plot)


def test_points_average_over_training_seeds_and_the_trend_pairs_shared_seeds(points_dir):
    # seed 1 of 1 and 7 stages; 3 stages only has seed 0
    _write(points_dir, "stages1", [2.2, 3.1, 4.2], f5.schedule([2]), seed=1)
    _write(points_dir, "stages7", [2.5, 3.5, 4.6], f5.schedule(f5.stage_layers(7, 2, 3, 30)), seed=1)
    page = f5.build_page(points_dir, "tiny", [1, 3, 7], CONFIG, seeds=[0, 1])
    one = page["points"]["1"]
    assert one["seeds"] == [0, 1] and one["per_seed"] == pytest.approx({"0": 0.1 / 3, "1": 0.5 / 3})
    # seed mean per segment: [2.1, 3.1, 4.1] -> diffs 0.1 each (no spread: interval collapses to the mean)
    assert one["delta_nll"]["mean"] == pytest.approx(0.1) and one["delta_nll"]["n"] == 3
    # over seeds: t_{0.975, 1} x sd of the two per-seed means / sqrt(2)
    t1, spread = 12.706204736174698, abs(0.5 / 3 - 0.1 / 3) / math.sqrt(2)
    d = one["delta_seeds"]
    assert d["mean"] == pytest.approx(0.1) and d["n"] == 2
    assert (d["low"], d["high"]) == pytest.approx((0.1 - t1 * spread / math.sqrt(2), 0.1 + t1 * spread / math.sqrt(2)))
    assert page["points"]["3"]["seeds"] == [0] and page["points"]["3"]["delta_seeds"]["low"] is None
    assert page["missing"] == [] and page["missing_by_seed"] == {"0": [], "1": ["stages3"]}
    trend = page["trend"]
    assert trend["stages"] == [7, 1] and trend["seeds"] == [0, 1]
    # seed means: 7 stages [2.4, 3.5, 4.5], 1 stage [2.1, 3.1, 4.1]
    assert trend["diff"]["mean"] == pytest.approx((0.3 + 0.4 + 0.4) / 3)
    assert trend["diff_seeds"]["n"] == 2
    text = f5.render(page)
    assert "seed 0: 0 missing; seed 1: 1 missing (stages3)" in text and "s0 +0.0333, s1 +0.1667" in text
    rows = list(__import__("csv").DictReader(f5.to_csv(page).splitlines()))
    assert rows[0]["seeds"] == "0 1" and rows[0]["per_seed_delta_nll"].startswith("0:0.0333")
    assert f5.build_page(points_dir, "tiny", [1, 3, 7], CONFIG, seeds=[1])["missing"] == [3]


def test_render_cli_reads_the_page_seeds(points_dir, tmp_path, capsys):
    _write(points_dir, "stages1", [2.2, 3.1, 4.2], f5.schedule([2]), seed=1)
    f5.main(["render", "--points", str(points_dir), "--model", "tiny-llama", "--stages", "1", "--seeds", "0 1",
             "--out", str(tmp_path / "out")])
    page = json.loads((tmp_path / "out" / "tiny-llama.json").read_text())
    assert page["seeds"] == [0, 1] and page["points"]["1"]["seeds"] == [0, 1]
    with pytest.raises(SystemExit):
        f5.main(["render", "--points", str(points_dir), "--model", "tiny-llama", "--seeds", "0 x",
                 "--out", str(tmp_path / "out")])
    assert "SEEDS" in capsys.readouterr().err


def test_page_says_which_points_ran_on_another_machine_than_dense(points_dir):
    _write(points_dir, "stages3", POINTS[3], f5.schedule(f5.stage_layers(3, 2, 3, 30)), cpu="EPYC")
    page = f5.build_page(points_dir, "tiny", [1, 3, 7], CONFIG)
    assert page["machine_split"]["points_crossing"] == 1 and page["machine_split"]["dense"] == "Test CPU"
    assert ("the dense reference ran on Test CPU, the point summaries (point x training seed) 1 on EPYC, 2 on Test "
            "CPU; 1 of the 3 points' Δ vs dense (the seed mean) includes NLLs computed on another machine than "
            "dense's.") in f5.render(page)
