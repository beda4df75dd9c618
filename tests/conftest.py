"""Shared fixtures: tiny random Llama / Qwen2 / Mistral / Qwen3 (/ Gemma3) models built from config (offline, CPU), and
fabricated finished lm-eval runs for the paper pages."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

from sdtp.config import compose  # noqa: E402
from sdtp.models import load_model  # noqa: E402
from sdtp.scorers.base import Scorer, ScoreContext  # noqa: E402

FAMILIES = ("llama", "qwen2", "mistral", "qwen3")
# Gemma3's sliding-window layers are supported by the pruning engine, training's masks, the labels
# (sdtp.models.layer_types), the attention scorers and KV compression (of its global layers).
ENGINE_FAMILIES = (*FAMILIES, "gemma3")


def _tiny(family: str):
    cfg = compose("generate", [f"model=tiny-{family}"])
    model, tokenizer = load_model(cfg.model)
    return model, tokenizer, cfg


@pytest.fixture(scope="session", params=FAMILIES)
def tiny(request):
    """(model, tokenizer, cfg) for one tiny architecture; parametrised over the full-attention families."""
    return _tiny(request.param)


@pytest.fixture(scope="session", params=ENGINE_FAMILIES)
def tiny_engine(request):
    """Like ``tiny``, over every family the pruning engine supports (Gemma3 too)."""
    return _tiny(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    cfg = compose("generate", ["model=tiny-llama"])
    model, tokenizer = load_model(cfg.model)
    return model, tokenizer, cfg


@pytest.fixture(scope="session")
def tiny_gemma3():
    """(model, tokenizer, cfg) of the tiny Gemma3: sliding-window layers (window 16) around a global one."""
    return _tiny("gemma3")


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


@pytest.fixture
def left_padded_batch():
    """(2, 40) token ids and their attention mask: row 1 left-padded by 7 (a ragged batch)."""
    ids = torch.randint(4, 260, (2, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for tiny-model tests: on a shared 2-core box, thread spin-waits dominate tiny matmuls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lm_eval_fingerprint(root: str, pruning: str, kv: str = "none", limit: dict | None = None,
                        num_fewshot: int = 5) -> dict:
    """A run fingerprint as sdtp-eval records it, for a clone at ``root`` (only the keys the pages read)."""
    return {"config": {"paths": {"root": root, "data_dir": f"{root}/../data"}, "seed": 0, "model": {"name": "tiny"},
                       "eval": {"limit": {"sdtp_copa": 3} if limit is None else limit, "batch_size": 4,
                                "num_fewshot": num_fewshot, "include_path": f"{root}/sdtp/eval/tasks"},
                       "pruning": {"name": pruning, "scorer": {"path": f"{root}/results/predictors/m"}},
                       "kv": {"method": kv, "ratio": 0.4, "keep_first": 4, "keep_recent": 0.1}},
            "dtype": "torch.bfloat16", "device": "cpu", "packages": {"lm_eval": "0.4.13"},
            "data": {f"{root}/../data/mc/copa.jsonl": "abc", f"{root}/sdtp/eval/tasks/sdtp_copa.yaml": "def"},
            "predictor": {f"{root}/results/predictors/m/predictor.safetensors": "123"} if pruning == "sdtp" else {},
            "git": {"commit": "c0ffee"}}


def write_lm_eval_run(path, outcomes: dict[str, list[int]], targets: dict[str, list[int]], choices: dict[str, int],
                      pruning: str = "none", kv: str = "none", kv_kept: float = 1.0, root: str = "/clone/a",
                      fingerprint: dict | None = None):
    """A finished ``sdtp-eval eval=lm_eval`` run directory: ``samples_<task>.jsonl`` with the given per-document
    correctness (every choice's log-likelihood ties, so lm-eval's pick is choice 0) and ``metrics.json``."""
    path.mkdir(parents=True)
    for task, accs in outcomes.items():
        rows = [{"doc_id": i, "target": targets[task][i], "resps": [[-1.0, False]] * choices[task], "acc": float(a)}
                for i, a in enumerate(accs)]
        (path / f"samples_{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    schedule = {"layers": [1, 2], "keep_fractions": [0.9, 0.81], "keep_first": 4, "keep_recent": 0.1}
    metrics = {"eval": "lm_eval", "model": "tiny", "dtype": "torch.bfloat16", "threads": 2, "wall_s": 60.0,
               "pruning": {"name": pruning, "schedule": schedule if pruning == "sdtp" else None},
               "kv": {"method": kv, "ratio": 0.4 if kv != "none" else 1.0, "kept_fraction": kv_kept},
               "avg_kept_fraction": 0.81 if pruning == "sdtp" else 1.0, "git_commit": "c0ffee",
               "results": {"num_fewshot": 5, "avg_layer_token_fraction": 0.9 if pruning == "sdtp" else 1.0,
                           "avg_pruned_prompt_tokens": 300.0 if pruning == "sdtp" else None, "pruned_prefills": 11},
               "machine": {"cpu_model": "Test CPU", "device": "cpu"}, "config": {"big": "dropped from the summary"},
               "fingerprint": fingerprint or lm_eval_fingerprint(root, pruning, kv)}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path
