"""The recency and norm priors blended into the predictor's ranking (sdtp/scorers/prior.py) and their selection."""

from __future__ import annotations

import json

import pytest
import torch

from sdtp.config import build_pruner, compose
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.eval.scoring import left_pad
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.reports.continuation_cells import predictor_hashes
from sdtp.reports.predictor_options import parse_args, scorer_specs
from sdtp.reports.prior_selection import select_prior, write_selected
from sdtp.scorers.base import ScoreContext
from sdtp.scorers.positional import PositionalScorer
from sdtp.scorers.predictor import PredictorScorer
from sdtp.models.chat import generation_suffix
from sdtp.scorers.prior import chat_rows, standardize

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
    # a non-finite masked score (padding states on some kernels) leaves the row as it is
    torch.testing.assert_close(standardize(torch.tensor([[1.0, 2.0, 3.0, float("nan")]]), valid), expected)
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


def _assert_batch_rows_keep_as_alone(model, prompts: list[torch.Tensor], scorer, references: list) -> None:
    """Prefill ``prompts`` (each (1, n)) left-padded in one batch with ``scorer``: row i keeps exactly the
    positions that ``references[i]`` keeps from prompt i run alone."""
    ids, mask = left_pad(prompts)
    pruner = TokenPruner(SCHEDULE, scorer)
    with pruner(model):
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    record = pruner.last_prefill
    for row, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        single = TokenPruner(SCHEDULE, reference)
        with single(model):
            model(prompt, use_cache=True)
        kept = record.final_positions[row]
        kept = kept[record.final_valid[row]] if record.final_valid is not None else kept
        assert torch.equal(kept, single.last_prefill.final_positions[0])


@torch.no_grad()
@pytest.mark.parametrize("priors", [{"recency_weight": 0.5}, {"recency_weight": 0.5, "attention_weight": 1.0}])
def test_ragged_batch_with_the_prior_equals_rows_alone(tiny_llama, priors):
    """Left padding changes no row's selection (the attention prior ignores padding keys)."""
    model = tiny_llama[0]
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 260, (1, n), generator=generator) for n in (61, 40)]
    scorer = PredictorScorer(predictor=_predictor(), **priors)
    _assert_batch_rows_keep_as_alone(model, prompts, scorer, [scorer, scorer])


def test_report_selects_the_weight_with_the_best_worst_cell_per_kind_and_writes_them(tmp_path):
    predictor = tmp_path / "p"
    _predictor().save(predictor)
    opts = parse_args(["--predictor", f"sdtp={predictor}", "--recency-weights", "0,0.5,1"])
    specs = scorer_specs(opts, str(tmp_path))
    assert [s.name for s in specs if s.group == "predictor"] == ["sdtp", "sdtp_rw0", "sdtp_rw0.5", "sdtp_rw1"]
    assert "pruning.scorer.recency_weight=0.5" in specs[-2].overrides
    # Text cells (means): best training-free scorer 1.2 / 2.05; margins w=0 (+0.1, +0.05), w=0.5 (-0.1, +0.15),
    # w=1 (-0.2, +0.45): worst cells +0.1 / +0.15 / +0.45 -> w=0 (although w=0.5 has the lower mean Δ).
    # The chat cell: best baseline 1.5; margins w=0 +0.3, w=0.5 -0.1, w=1 -0.1 -> w=0.5 (tie: the smaller).
    cells = [
        {"dense": [1.0, 1.0], "positional": [1.2, 1.2], "norm": [1.5, 1.5],
         "sdtp_rw0": [1.3, 1.3], "sdtp_rw0.5": [1.1, 1.1], "sdtp_rw1": [1.0, 1.0]},
        {"dense": [2.0, 2.0], "positional": [2.2, 2.2], "lazyllm": [2.05, 2.05],
         "sdtp_rw0": [2.1, 2.1], "sdtp_rw0.5": [2.2, 2.2], "sdtp_rw1": [2.5, 2.5]},
        {"dense": [3.0, 3.0], "sdtp_rw0": [9.0, 9.0]},  # no training-free scorer: skipped
        {"dense": [1.0, 1.0], "norm": [1.5, 1.5], "sdtp_rw0": [1.8, 1.8], "sdtp_rw0.5": [1.4, 1.4],
         "sdtp_rw1": [1.4, 1.4]},
    ]
    selection = select_prior(["sdtp"], opts.recency_weights, cells, ["text", "text", "text", "chat"])["sdtp"]
    text, chat = selection["text"], selection["chat"]
    assert text["cells"] == 2 and chat["cells"] == 1
    assert text["worst_margin_vs_best_baseline"] == pytest.approx({"0": 0.1, "0.5": 0.15, "1": 0.45})
    assert text["mean_delta_vs_dense"] == pytest.approx({"0": 0.2, "0.5": 0.15, "1": 0.25})
    assert text["selected"] == 0.0 and chat["selected"] == 0.5
    text["selected"] = 2.0
    write_selected({"sdtp": predictor}, {"sdtp": selection})
    meta = json.loads((predictor / "predictor.json").read_text())
    assert (meta["recency_weight"], meta["recency_weight_chat"]) == (2.0, 0.5)
    loaded = TokenPredictor.load(predictor).meta
    assert (loaded.recency_weight, loaded.recency_weight_chat) == (2.0, 0.5)


def test_selection_needs_two_weights_computed_in_every_cell():
    """A predictor with one weight's row in every cell (a baseline copied in for comparison) is not selected,
    so --write-selected never overwrites its setting with the only value it was compared at."""
    cells = [{"dense": [1.0], "norm": [1.5], "sdtp_rw0": [1.3], "new_rw0": [1.2], "new_rw1": [1.1]},
             {"dense": [2.0], "norm": [2.5], "sdtp_rw0": [2.3], "new_rw0": [2.2], "new_rw1": [2.1], "sdtp_rw1": [2.0]}]
    selection = select_prior(["sdtp", "new"], (0.0, 1.0), cells)
    assert "sdtp" not in selection and selection["new"]["text"]["selected"] == 1.0


def test_predictor_hash_ignores_the_prior_weights(tmp_path):
    _predictor().save(tmp_path)
    before = predictor_hashes(tmp_path)
    meta = json.loads((tmp_path / "predictor.json").read_text())
    (tmp_path / "predictor.json").write_text(json.dumps({**meta, "recency_weight": 3.0, "recency_weight_chat": 1.0}))
    assert predictor_hashes(tmp_path) == before
    (tmp_path / "predictor.json").write_text(json.dumps({**meta, "hidden_ratio": 0.5}))
    assert predictor_hashes(tmp_path) != before


# --------------------------------------------------------------------------------------------
# prompt kinds: raw text vs chat


SUFFIX = (7, 8, 9)


def test_chat_rows_by_hand():
    ids = torch.tensor([[5, 7, 8, 9], [7, 8, 9, 5], [0, 0, 8, 9]])
    assert chat_rows(ids, SUFFIX).tolist() == [True, False, False]
    assert chat_rows(ids, None).tolist() == [False, False, False]
    assert chat_rows(ids[:, :2], SUFFIX).tolist() == [False, False, False]  # shorter than the suffix


def test_norm_prior_is_the_hand_blend_and_resolves_like_recency():
    """z(pred) + w_r z(recency) + w_n z(log ||h||), by hand; the norm weights resolve per kind as recency's."""
    predictor = _predictor()
    hidden, positions = torch.randn(1, 6, 64) * torch.arange(1.0, 7.0)[None, :, None], torch.tensor([[0, 2, 3, 7, 8, 9]])
    raw = predictor(0, hidden, positions, torch.tensor([10]))
    blended = PredictorScorer(predictor=predictor, recency_weight=0.5, norm_weight=2.0).score(_context(hidden, positions, 10))

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    distance = torch.tensor([9.0, 7, 6, 2, 1, 0])
    expected = z(raw) + 0.5 * z(-torch.log1p(distance)) + 2.0 * z(hidden.norm(dim=-1).log())
    torch.testing.assert_close(blended, expected, atol=1e-5, rtol=1e-5)
    predictor.meta.norm_weight, predictor.meta.norm_weight_chat = 1.0, 3.0
    scorer = PredictorScorer(predictor=predictor)
    assert (scorer.prior_weight("norm", chat=False), scorer.prior_weight("norm", chat=True)) == (1.0, 3.0)
    assert PredictorScorer(predictor=predictor, norm_weight=0.0).prior_weight("norm", chat=True) == 0.0
    with pytest.raises(ValueError, match="norm_weight_chat"):
        PredictorScorer(predictor=predictor, norm_weight_chat=-1.0)


def test_chat_weight_resolution(tmp_path):
    predictor = _predictor(recency_weight=4.0)
    assert PredictorScorer(predictor=predictor).recency_weight_chat == 4.0  # no chat weight: the text one
    predictor.meta.recency_weight_chat = 0.5
    scorer = PredictorScorer(predictor=predictor)
    assert (scorer.recency_weight, scorer.recency_weight_chat) == (4.0, 0.5)
    assert PredictorScorer(predictor=predictor, recency_weight=0.0).recency_weight_chat == 0.0  # sets both kinds
    assert PredictorScorer(predictor=predictor, recency_weight=1.0, recency_weight_chat=2.0).recency_weight_chat == 2.0
    with pytest.raises(ValueError, match="recency_weight_chat"):
        PredictorScorer(predictor=predictor, recency_weight_chat=-1.0)


class _ChatTemplateTokenizer:
    """Just enough of a tokenizer: chat template ``<u>{content}</u>`` + generation prompt ``<a>``."""

    chat_template = "fake"
    vocab = {"<u>": 1, "</u>": 2, "<a>": 3, "x": 4}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        return "<u>" + messages[0]["content"] + "</u>" + ("<a>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens):
        ids = [self.vocab[t] for t in text.replace("<", " <").replace(">", "> ").split()]
        return type("Encoding", (), {"input_ids": ids})()


def test_generation_suffix_is_the_tail_the_generation_prompt_adds(tiny_llama):
    assert generation_suffix(_ChatTemplateTokenizer()) == (3,)
    assert generation_suffix(tiny_llama[1]) is None  # the byte tokenizer has no chat template
    assert tiny_llama[0].sdtp_chat_suffix is None


@torch.no_grad()
def test_a_mixed_batch_uses_each_row_kind_weight(tiny_llama, monkeypatch):
    """A chat row is ranked with the chat weight and a text row with the text weight, as each alone."""
    model = tiny_llama[0]
    monkeypatch.setattr(model, "sdtp_chat_suffix", SUFFIX, raising=False)
    generator = torch.Generator().manual_seed(5)
    text = torch.randint(10, 260, (1, 57), generator=generator)
    chat = torch.cat([torch.randint(10, 260, (1, 45), generator=generator), torch.tensor([SUFFIX])], dim=1)
    predictor = _predictor(recency_weight=1e6)  # text rows: positional ranking
    predictor.meta.recency_weight_chat = 0.0  # chat rows: the predictor alone
    _assert_batch_rows_keep_as_alone(model, [text, chat], PredictorScorer(predictor=predictor),
                                     [PositionalScorer(), PredictorScorer(predictor=predictor, recency_weight=0.0)])


class _RecordingAttention(PredictorScorer):
    """The shipped scorer with an attention prior that also keeps, per stage, its inputs and output."""

    def begin(self, input_ids, extras):
        super().begin(input_ids, extras)
        self.calls = []

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        out = super().score(ctx)
        self.calls.append((ctx, out, self._attention.score(ctx)))
        return out


@torch.no_grad()
def test_attention_prior_is_the_hand_blend_of_the_lazyllm_ranking_and_unhooks(tiny_llama, prompt_ids):
    """z(pred) + w_a z(log attention of the last m prompt tokens) at every stage of a real prefill; the
    attention scorer's hooks exist only while the pruner is attached, and not at all with weight 0."""
    model, _, _ = tiny_llama
    predictor = _predictor()
    scorer = _RecordingAttention(predictor=predictor, recency_weight=0.0, attention_weight=1.5, attention_queries=5)
    attention_layers = [layer.self_attn for layer in model.model.layers]
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in attention_layers)  # noqa: E731
    before = hooks()
    with TokenPruner(SCHEDULE, scorer)(model):
        assert hooks() > before
        model(prompt_ids, use_cache=True)
    assert hooks() == before and len(scorer.calls) == 3

    def z(x):
        return (x - x.mean()) / x.std(unbiased=False)

    for ctx, out, attention in scorer.calls:
        assert attention.shape == ctx.positions.shape and float(attention.sum()) == pytest.approx(1.0, abs=1e-3)
        raw = predictor(ctx.stage, ctx.hidden_states, ctx.positions, torch.tensor([ctx.seq_len]))
        torch.testing.assert_close(out, z(raw) + 1.5 * z(attention.clamp(min=1e-12).log()), atol=1e-4, rtol=1e-4)
    with TokenPruner(SCHEDULE, PredictorScorer(predictor=predictor, attention_weight=0.0))(model):
        assert hooks() == before
    with pytest.raises(ValueError, match="attention_queries"):
        PredictorScorer(predictor=predictor, attention_queries=0)
