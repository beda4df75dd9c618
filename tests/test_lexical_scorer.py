"""The lexical query-match scorer (sdtp/scorers/lexical.py) alone and as the predictor's prior."""

from __future__ import annotations

import math

import pytest
import torch

from sdtp.config import build_pruner, compose
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.eval.scoring import left_pad
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.scorers.base import ScoreContext
from sdtp.scorers.lexical import POWER, QUERY_TOKENS, WINDOW, LexicalScorer, prompt_match, query_match
from sdtp.scorers.predictor import PredictorScorer

pytestmark = pytest.mark.usefixtures("single_thread")
SCHEDULE = PruningSchedule(layers=(1, 2), keep_fractions=(0.6, 0.4), keep_first=4, keep_recent=0.1)


def test_query_match_by_hand():
    """Query = the last token (id 5); id 5 occurs 3 times in 7 tokens -> idf log(7/3) at its two earlier
    places, spread by a box of 3 (zeros beyond the ends count in the mean); the query itself gets 0."""
    ids = torch.tensor([[5, 6, 7, 5, 8, 9, 5]])
    idf = math.log(7 / 3)
    expected = torch.tensor([[idf, idf, idf, idf, idf, 0.0, 0.0]]) / 3
    torch.testing.assert_close(query_match(ids, None, query_tokens=1, window=1), expected)
    torch.testing.assert_close(query_match(ids, None, query_tokens=1, window=1, power=2.0), expected * idf)
    # a word every token is (idf 0) matches nothing
    assert torch.equal(query_match(torch.full((1, 6), 3), None, query_tokens=2, window=1), torch.zeros(1, 6))


def test_left_padded_rows_match_their_unpadded_selves():
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 12, (1, n), generator=generator) for n in (40, 23)]
    ids, mask = left_pad(rows)
    batch = query_match(ids, mask, query_tokens=5, window=3)
    for b, row in enumerate(rows):
        n = row.shape[1]
        torch.testing.assert_close(batch[b, -n:], query_match(row, None, query_tokens=5, window=3)[0])
        assert torch.equal(batch[b, :-n], torch.zeros(ids.shape[1] - n))


def test_prompt_match_reads_each_rows_prompt_alone():
    """Rows with a continuation after the prompt and right padding: the prompt's match is that of the
    prompt alone (the default settings), and everything else gets 0."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30, (2, 300), generator=generator)
    prompt = torch.zeros(2, 300, dtype=torch.bool)
    prompt[0, :250], prompt[1, :180] = True, True
    out = prompt_match(ids, prompt)
    for b, n in enumerate((250, 180)):
        torch.testing.assert_close(out[b, :n], query_match(ids[b : b + 1, :n], None, QUERY_TOKENS, WINDOW, POWER)[0])
        assert torch.equal(out[b, n:], torch.zeros(300 - n))
    assert bool(out[0, :200].gt(0).any())


@torch.no_grad()
def test_pruned_prefill_keeps_the_best_matches_besides_the_protected_tokens(tiny_llama):
    """With the lexical scorer every unprotected token kept scores at least as high as every token
    dropped (ties may go either way), and the scorer's match lines up with a left-padded row."""
    model, _, _ = tiny_llama
    generator = torch.Generator().manual_seed(3)
    prompt = torch.randint(4, 40, (1, 90), generator=generator)  # a small vocabulary: plenty of matches
    scorer = LexicalScorer(query_tokens=6, window=4, power=1.0)
    pruner = TokenPruner(SCHEDULE, scorer)
    with pruner(model):
        model(prompt, use_cache=True)
    match = query_match(prompt, None, 6, 4)[0]
    kept = pruner.last_prefill.final_positions[0]
    protected = torch.zeros(90, dtype=torch.bool)
    protected[:4], protected[-9:] = True, True
    alive = torch.zeros(90, dtype=torch.bool)
    alive[kept] = True
    assert int(alive.sum()) == round(0.4 * 90)
    assert float(match[alive & ~protected].min()) >= float(match[~alive].max())
    # the same prompt left-padded in a batch: the scorer reads each row's own columns
    ids, mask = left_pad([prompt, prompt[:, :50]])
    ctx = ScoreContext(layer=1, stage=0, hidden_states=torch.zeros(2, 90, 64), positions=torch.arange(90).repeat(2, 1),
                       seq_len=90, model=model, seq_lens=torch.tensor([90, 50]))
    scorer.begin(ids, {"attention_mask": mask})
    torch.testing.assert_close(scorer.score(ctx)[0], match)
    torch.testing.assert_close(scorer.score(ctx)[1, :50], query_match(prompt[:, :50], None, 6, 4)[0])


class _Recording(PredictorScorer):
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        out = super().score(ctx)
        self.calls.append((ctx, out, self._lexical.score(ctx)))
        return out


@torch.no_grad()
def test_lexical_prior_is_the_hand_blend_and_absent_at_weight_zero(tiny_llama):
    model, _, _ = tiny_llama
    # long enough for the default window (128 tokens each side) to vary along the prompt
    prompt_ids = torch.randint(4, 200, (1, 600), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], base_model="tiny-llama", num_layers=4))
    scorer = _Recording(predictor=predictor, recency_weight=0.0, lexical_weight=2.0)
    scorer.calls = []
    with TokenPruner(SCHEDULE, scorer)(model):
        model(prompt_ids, use_cache=True)
    assert len(scorer.calls) == 2

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    for ctx, out, match in scorer.calls:
        raw = predictor(ctx.stage, ctx.hidden_states, ctx.positions, torch.tensor([ctx.seq_len]))
        torch.testing.assert_close(out, z(raw) + 2.0 * z(match), atol=1e-4, rtol=1e-4)
    plain = PredictorScorer(predictor=predictor, lexical_weight=0.0)
    plain.bind(model, (1, 2))
    assert plain._lexical is None


@torch.no_grad()
def test_lexical_window_sets_the_prior_match_and_is_refused_for_a_lexical_input(tiny_llama):
    """``lexical_window`` averages the prior's match over that many tokens each side (the standalone scorer's
    ``window``); a checkpoint whose lexical input was trained at the default window refuses another one."""
    model, _, _ = tiny_llama
    prompt_ids = torch.randint(4, 200, (1, 600), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], base_model="tiny-llama", num_layers=4))
    scorer = _Recording(predictor=predictor, recency_weight=0.0, lexical_weight=2.0, lexical_window=16)
    scorer.calls = []
    with TokenPruner(SCHEDULE, scorer)(model):
        model(prompt_ids, use_cache=True)
    expected = query_match(prompt_ids, None, QUERY_TOKENS, 16, POWER)[0]
    for ctx, _, match in scorer.calls:
        torch.testing.assert_close(match[0], expected[ctx.positions[0]])
    assert not torch.allclose(expected, query_match(prompt_ids, None, QUERY_TOKENS, WINDOW, POWER)[0])
    with pytest.raises(ValueError, match="lexical_window: must be >= 1"):
        PredictorScorer(predictor=predictor, lexical_window=0)
    featured = TokenPredictor(PredictorMeta(hidden_size=64, layers=[1, 2], base_model="tiny-llama", num_layers=4,
                                            lexical_feature=True))
    with pytest.raises(ValueError, match="trained with the default window"):
        PredictorScorer(predictor=featured, lexical_window=16).bind(model, (1, 2))
    PredictorScorer(predictor=featured, lexical_window=WINDOW).bind(model, (1, 2))  # the default is fine


def test_bad_settings_fail_when_the_pruner_is_built():
    with pytest.raises(Exception, match="pruning.scorer.window: must be >= 1"):  # Hydra wraps the ValueError
        build_pruner(compose("eval", ["model=tiny-llama", "pruning=lexical", "pruning.scorer.window=0"]))
    with pytest.raises(ValueError, match="power"):
        LexicalScorer(power=0.0)
