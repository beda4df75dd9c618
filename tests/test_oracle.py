"""Oracle scorer: saliency computed inside an inference-mode pruned prefill keeps the most salient tokens."""

from __future__ import annotations

import pytest
import torch

from sdtp.engine.generation import prefill
from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.errors import ConfigError
from sdtp.engine.selection import protected_mask, select_kept
from sdtp.saliency import capture_layer_inputs, saliency_scores
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.oracle import OracleScorer, sampled_continuations

SCHEDULE = PruningSchedule(layers=(1,), keep_fractions=(0.5,), keep_first=2, keep_recent=0.1)


def test_oracle_inside_pruned_prefill(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, OracleScorer())
    with pruner(model):
        hooks_before = [dict(layer._forward_pre_hooks) for layer in model.model.layers]
        logits, _, _ = prefill(model, prompt_ids)
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
    """The kept set is the protected tokens plus the largest norms of the dense hidden state entering layer 1."""
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, HiddenNormScorer())
    with pruner(model):
        prefill(model, prompt_ids)
    n = prompt_ids.shape[1]
    with torch.no_grad(), capture_layer_inputs(model, [1]) as captured:
        model(prompt_ids)  # stage 0 sits before layer 1: what it scores is still the dense state
    norms = captured[1].float().norm(dim=-1)
    positions = torch.arange(n)[None]
    expected = select_kept(norms, protected_mask(positions, n, 2, SCHEDULE.num_recent(n)), SCHEDULE.budget(0, n))
    assert torch.equal(pruner.last_prefill.final_positions, expected)
    smallest = select_kept(-norms, protected_mask(positions, n, 2, SCHEDULE.num_recent(n)), SCHEDULE.budget(0, n))
    assert not torch.equal(expected, smallest)  # the ranking decides the set, not the budget alone


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
        prefill(model, prompt_ids)


def test_sampled_oracle_labels_with_the_models_own_continuations(tiny_llama, prompt_ids):
    """samples=k: the kept set is the top set of the attention label averaged over k continuations sampled
    from the dense model (the same ones :func:`sampled_continuations` draws for this prompt and seed)."""
    model, _, _ = tiny_llama
    pruner = TokenPruner(SCHEDULE, OracleScorer(target="attention", samples=3, sample_len=5, sample_seed=4))
    with pruner(model):
        prefill(model, prompt_ids)  # no continuation needed: the oracle draws its own
    n = prompt_ids.shape[1]
    full, valid = sampled_continuations(model, prompt_ids, 3, 5, seed=4)
    label = saliency_scores(model, full, [1], "attention", normalize=False, valid=valid,
                            split=torch.full((3,), n))[:, :n, 0].mean(0, keepdim=True)
    expected = select_kept(label, protected_mask(torch.arange(n)[None], n, 2, SCHEDULE.num_recent(n)),
                           SCHEDULE.budget(0, n))
    assert torch.equal(pruner.last_prefill.final_positions, expected)


def test_sampled_continuations_are_seeded_by_the_prompt_and_end_at_their_first_eos(tiny_llama, prompt_ids):
    model, _, _ = tiny_llama
    n = prompt_ids.shape[1]
    first, valid = sampled_continuations(model, prompt_ids, 4, 6, seed=0)
    assert torch.equal(first, sampled_continuations(model, prompt_ids, 4, 6, seed=0)[0])
    assert not torch.equal(first, sampled_continuations(model, prompt_ids, 4, 6, seed=1)[0])
    assert torch.equal(first[:, :n], prompt_ids.expand(4, -1)) and valid[:, :n].all()
    eos = list(range(0, model.config.vocab_size, 3))  # a third of the vocabulary ends a sample
    saved, model.generation_config.eos_token_id = model.generation_config.eos_token_id, eos
    try:
        ids, valid = sampled_continuations(model, prompt_ids, 4, 6, seed=0)
    finally:
        model.generation_config.eos_token_id = saved
    lengths = valid[:, n:].sum(1)
    assert lengths.min() < 6  # some sample stopped early (deterministic: the samples are seeded)
    for row, length in enumerate(lengths.tolist()):
        assert valid[row, n:n + length].all() and not valid[row, n + length:].any()
        ends = [int(t) in eos for t in ids[row, n:n + length]]
        assert ends[:-1] == [False] * (length - 1) and (ends[-1] or length == 6)  # stops after its first EOS


def test_sampled_oracle_refuses_gold_and_bad_counts():
    with pytest.raises(ValueError, match="choose one"):
        OracleScorer(gold=True, samples=2)
    with pytest.raises(ValueError, match="samples must be >= 0"):
        OracleScorer(samples=-1)


@pytest.mark.parametrize("overrides, message", [
    (["+pruning.scorer.gold=true", "eval=lm_eval"], "only eval=continuation"),
    (["+pruning.scorer.gold=true", "eval=continuation", "eval.batch_size=2"], "eval.batch_size=1"),
    (["+pruning.scorer.samples=2", "eval=continuation", "eval.batch_size=2"], "eval.batch_size=1"),
])
def test_label_oracles_config_refused_outside_one_segment_at_a_time(overrides, message):
    from sdtp.cli.evaluate import validate_eval
    from sdtp.config import compose

    cfg = compose("eval", ["pruning=oracle", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_eval(cfg)


def test_report_gold_oracle_rows(tmp_path):
    from sdtp.reports.predictor_options import parse_args, scorer_specs

    opts = parse_args(["--oracle", "--oracle-targets", "attention,continuation", "--oracle-gold",
                       "--oracle-samples", "4", "--cont-len", "32"])
    oracles = [s for s in scorer_specs(opts, str(tmp_path)) if s.group == "oracle"]
    assert [s.name for s in oracles] == ["oracle_attention", "oracle_continuation",
                                         "oracle_attention_gold", "oracle_continuation_gold",
                                         "oracle_attention_sampled", "oracle_continuation_sampled"]
    assert ["+pruning.scorer.gold=true" in s.overrides for s in oracles] == [False, False, True, True, False, False]
    assert oracles[-1].overrides[-2:] == ("+pruning.scorer.samples=4", "+pruning.scorer.sample_len=32")
