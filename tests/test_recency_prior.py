"""The recency prior blended into the predictor's ranking (sdtp/scorers/prior.py)."""

from __future__ import annotations

import json

import pytest
import torch

from sdtp.config import build_pruner, compose
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.eval.scoring import left_pad
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.reports import predictor_eval
from sdtp.reports.recency_selection import select_recency, write_selected
from sdtp.scorers.base import ScoreContext
from sdtp.scorers.positional import PositionalScorer
from sdtp.scorers.predictor import PredictorScorer
from sdtp.scorers.prior import standardize

pytestmark = pytest.mark.usefixtures("single_thread")
SCHEDULE = PruningSchedule(layers=(1, 2, 3), keep_fractions=(0.8, 0.6, 0.45), keep_first=4, keep_recent=0.1)


def _predictor(recency_weight: float = 0.0) -> TokenPredictor:
    torch.manual_seed(0)
    meta = PredictorMeta(hidden_size=64, layers=[1, 2, 3], base_model="tiny-llama", num_layers=4,
                         recency_weight=recency_weight)
    return TokenPredictor(meta)


def _context(hidden: torch.Tensor, positions: torch.Tensor, seq_len: int, valid=None, seq_lens=None) -> ScoreContext:
    return ScoreContext(layer=1, stage=0, hidden_states=hidden, positions=positions, seq_len=seq_len, model=None,
                        valid=valid, seq_lens=seq_lens)


def test_standardize_by_hand_and_ignores_masked_slots():
    scores = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    valid = torch.tensor([[True, True, True, False]])
    # mean 2, population std sqrt(2/3) over the three real slots; the masked slot becomes 0
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / (2 / 3) ** 0.5 * torch.tensor([[1, 1, 1, 0]])
    torch.testing.assert_close(standardize(scores, valid), expected)
    assert torch.equal(standardize(torch.full((1, 3), 5.0)), torch.zeros(1, 3))


def test_weight_zero_is_the_raw_predictor_and_weight_w_is_the_hand_blend():
    predictor = _predictor()
    hidden, positions = torch.randn(1, 6, 64), torch.tensor([[0, 2, 3, 7, 8, 9]])
    raw = predictor(0, hidden, positions, torch.tensor([10]))
    ctx = _context(hidden, positions, 10)
    assert torch.equal(PredictorScorer(predictor=predictor).score(ctx), raw)
    blended = PredictorScorer(predictor=predictor, recency_weight=0.5).score(ctx)

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    distance = torch.tensor([9.0, 7, 6, 2, 1, 0])
    torch.testing.assert_close(blended, z(raw) + 0.5 * z(-torch.log1p(distance)), atol=1e-5, rtol=1e-5)


def test_checkpoint_weight_is_used_unless_overridden(tmp_path, tiny_llama):
    _predictor(recency_weight=2.0).save(tmp_path)
    assert json.loads((tmp_path / "predictor.json").read_text())["recency_weight"] == 2.0
    model = tiny_llama[0]
    for override, expected in ((None, 2.0), (0.0, 0.0), (0.25, 0.25)):
        cfg = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}",
                                   f"pruning.scorer.recency_weight={'null' if override is None else override}"])
        pruner = build_pruner(cfg)
        with pruner(model):
            assert pruner.scorer.recency_weight == expected


def test_negative_weight_is_refused(tmp_path):
    _predictor().save(tmp_path)
    cfg = compose("generate", ["model=tiny-llama", "pruning=sdtp", f"pruning.scorer.path={tmp_path}",
                               "pruning.scorer.recency_weight=-1"])
    with pytest.raises(Exception, match="recency_weight"):
        build_pruner(cfg)


@torch.no_grad()
def test_a_dominant_prior_keeps_what_the_positional_rule_keeps(tiny_llama, prompt_ids):
    model = tiny_llama[0]
    kept = []
    for scorer in (PredictorScorer(predictor=_predictor(), recency_weight=1e6), PositionalScorer()):
        pruner = TokenPruner(SCHEDULE, scorer)
        with pruner(model):
            model(prompt_ids, use_cache=True)
        kept.append(pruner.last_prefill.final_positions)
    assert torch.equal(kept[0], kept[1])


@torch.no_grad()
def test_ragged_batch_with_the_prior_equals_rows_alone(tiny_llama):
    model = tiny_llama[0]
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 260, (1, n), generator=generator) for n in (61, 40)]
    ids, mask = left_pad(prompts)
    scorer = PredictorScorer(predictor=_predictor(), recency_weight=0.5)
    pruner = TokenPruner(SCHEDULE, scorer)
    with pruner(model):
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    record = pruner.last_prefill
    for row, prompt in enumerate(prompts):
        single = TokenPruner(SCHEDULE, scorer)
        with single(model):
            model(prompt, use_cache=True)
        kept = record.final_positions[row]
        kept = kept[record.final_valid[row]] if record.final_valid is not None else kept
        assert torch.equal(kept, single.last_prefill.final_positions[0])


def test_report_selects_the_weight_with_the_best_worst_cell_and_writes_it(tmp_path):
    predictor = tmp_path / "p"
    _predictor().save(predictor)
    opts = predictor_eval.parse_args(["--predictor", f"sdtp={predictor}", "--recency-weights", "0,0.5,1"])
    specs = predictor_eval.scorer_specs(opts, str(tmp_path))
    assert [s.name for s in specs if s.group == "predictor"] == ["sdtp", "sdtp_rw0", "sdtp_rw0.5", "sdtp_rw1"]
    assert "pruning.scorer.recency_weight=0.5" in specs[-2].overrides
    # Per cell (means): best training-free scorer 1.2 / 2.05; margins w=0 (+0.1, +0.05), w=0.5 (-0.1, +0.15),
    # w=1 (-0.2, +0.45): worst cells +0.1 / +0.15 / +0.45 -> w=0 (although w=0.5 has the lower mean Δ).
    cells = [
        {"dense": [1.0, 1.0], "positional": [1.2, 1.2], "norm": [1.5, 1.5],
         "sdtp_rw0": [1.3, 1.3], "sdtp_rw0.5": [1.1, 1.1], "sdtp_rw1": [1.0, 1.0]},
        {"dense": [2.0, 2.0], "positional": [2.2, 2.2], "lazyllm": [2.05, 2.05],
         "sdtp_rw0": [2.1, 2.1], "sdtp_rw0.5": [2.2, 2.2], "sdtp_rw1": [2.5, 2.5]},
        {"dense": [3.0, 3.0], "sdtp_rw0": [9.0, 9.0]},  # no training-free scorer: skipped
    ]
    selection = select_recency(["sdtp"], opts.recency_weights, cells)["sdtp"]
    assert selection["worst_margin_vs_best_baseline"] == pytest.approx({"0": 0.1, "0.5": 0.15, "1": 0.45})
    assert selection["mean_delta_vs_dense"] == pytest.approx({"0": 0.2, "0.5": 0.15, "1": 0.25})
    assert selection["selected"] == 0.0
    selection["selected"] = 0.5
    selection = {"sdtp": selection}
    write_selected({"sdtp": predictor}, selection)
    assert json.loads((predictor / "predictor.json").read_text())["recency_weight"] == 0.5
    assert TokenPredictor.load(predictor).meta.recency_weight == 0.5
