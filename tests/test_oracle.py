"""Oracle scorer: saliency computed inside an inference-mode pruned prefill keeps the most salient tokens."""

from __future__ import annotations

import pytest
import torch

from sdtp.engine.generation import prefill
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.engine.selection import protected_mask, select_kept
from sdtp.saliency import saliency_scores
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.oracle import OracleScorer

SCHEDULE = PruningSchedule(layers=(1,), keep_fractions=(0.5,), keep_first=2, keep_recent=0.1)


def test_oracle_inside_pruned_prefill(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, OracleScorer())
    with pruner(model):
        hooks_before = [dict(layer._forward_pre_hooks) for layer in model.model.layers]
        logits, _, _ = prefill(model, prompt_ids, pruner)
        hooks_after = [dict(layer._forward_pre_hooks) for layer in model.model.layers]
    assert hooks_before == hooks_after and logits.shape == (1, 1, model.config.vocab_size)
    # The kept set is the top-saliency set of the dense model at layer 1 (computed independently),
    # the default target being the CE of the prompt's protected last 10% (the continuation stand-in).
    n = prompt_ids.shape[1]
    split = torch.tensor([n - SCHEDULE.num_recent(n)])
    saliency = saliency_scores(model, prompt_ids, [1], "continuation", normalize=False, split=split)[..., 0]
    positions = torch.arange(n)[None]
    expected = select_kept(saliency, protected_mask(positions, n, 2, SCHEDULE.num_recent(n)), SCHEDULE.budget(0, n))
    assert torch.equal(pruner.last_prefill.final_positions, expected)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)


def test_norm_scorer_keeps_largest_norms(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, HiddenNormScorer())
    with pruner(model):
        prefill(model, prompt_ids, pruner)
    assert pruner.last_prefill.kept_per_stage == [SCHEDULE.budget(0, prompt_ids.shape[1])]


def test_gold_oracle_labels_with_the_real_continuation(tiny_llama, prompt_ids):
    """gold=True: the continuation protocol reveals the segment's continuation, and the kept set is the
    top set of the attention label computed on prompt + continuation (split at the prompt's end)."""
    from sdtp.eval.continuation import score_segment

    model, _, _ = tiny_llama
    cont = torch.randint(4, 200, (1, 6), generator=torch.Generator().manual_seed(3))
    pruner = TokenPruner(SCHEDULE, OracleScorer(target="attention", gold=True))
    score_segment(model, prompt_ids, cont, pruner)  # installs the pruner around the prefill itself
    n = prompt_ids.shape[1]
    full = torch.cat([prompt_ids, cont], dim=1)
    label = saliency_scores(model, full, [1], "attention", normalize=False, split=torch.tensor([n]))[:, :n, 0]
    expected = select_kept(label, protected_mask(torch.arange(n)[None], n, 2, SCHEDULE.num_recent(n)),
                           SCHEDULE.budget(0, n))
    assert torch.equal(pruner.last_prefill.final_positions, expected)
    assert pruner.scorer.future is None  # used once: the next prompt cannot reuse it
    tail = saliency_scores(model, prompt_ids, [1], "attention", normalize=False,
                           split=torch.tensor([n - SCHEDULE.num_recent(n)]))[..., 0]
    assert not torch.allclose(label, tail)  # a different question from the prompt-tail oracle


def test_gold_oracle_without_a_continuation_fails_clearly(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, OracleScorer(target="attention", gold=True))
    with pruner(model), pytest.raises(ValueError, match="only eval=continuation"):
        prefill(model, prompt_ids, pruner)


@pytest.mark.parametrize("overrides, message", [
    (["eval=lm_eval"], "only eval=continuation"),
    (["eval=continuation", "eval.batch_size=2"], "eval.batch_size=1"),
])
def test_gold_oracle_config_refused_outside_the_continuation_protocol(overrides, message):
    from sdtp.cli.evaluate import validate_eval
    from sdtp.config import compose

    cfg = compose("eval", ["pruning=oracle", "+pruning.scorer.gold=true", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_eval(cfg)


def test_report_gold_oracle_rows(tmp_path):
    from sdtp.reports import predictor_eval

    opts = predictor_eval.parse_args(["--oracle", "--oracle-targets", "attention,continuation", "--oracle-gold"])
    oracles = [s for s in predictor_eval.scorer_specs(opts, str(tmp_path)) if s.group == "oracle"]
    assert [s.name for s in oracles] == ["oracle_attention", "oracle_continuation",
                                         "oracle_attention_gold", "oracle_continuation_gold"]
    assert ["+pruning.scorer.gold=true" in s.overrides for s in oracles] == [False, False, True, True]
