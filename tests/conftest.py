"""Shared fixtures: tiny random Llama / Qwen2 / Mistral models built from config (offline, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from sdtp.config import compose  # noqa: E402
from sdtp.models import load_model  # noqa: E402
from sdtp.scorers.base import Scorer, ScoreContext  # noqa: E402

FAMILIES = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request):
    """(model, tokenizer, cfg) for one tiny architecture; parametrised over all three families."""
    cfg = compose("generate", [f"model=tiny-{request.param}"])
    model, tokenizer = load_model(cfg.model)
    return model, tokenizer, cfg


@pytest.fixture(scope="session")
def tiny_llama():
    cfg = compose("generate", ["model=tiny-llama"])
    model, tokenizer = load_model(cfg.model)
    return model, tokenizer, cfg


class PositionScorer(Scorer):
    """Deterministic scores that depend only on a token's original position (for exact checks)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (N_max,) score per original position

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.table[ctx.positions]


@pytest.fixture
def prompt_ids():
    """(1, 97) token ids: odd length so rounding in the budgets is exercised."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, 260, (1, 97), generator=generator)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for tiny-model tests: on a shared 2-core box, thread spin-waits dominate tiny matmuls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
