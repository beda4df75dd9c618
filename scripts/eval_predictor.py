"""Held-out check of a trained SDTP predictor against training-free scorers.

    PYTHONPATH=. python scripts/eval_predictor.py model=smollm2-135m data=dolly_c4 threads=1 \
        +windows=16 +window_len=512 +oracle=true +out=results/predictors/smollm2-135m/eval.json

Overrides are those of ``sdtp-train`` (model, data, pruning schedule, train.labels_dir, ...).

1. Ranking agreement with gradient x input saliency on the held-out labelled sequences (the last
   ``train.val_sequences`` of the label set, never trained on): Spearman and top-k overlap at each
   stage's kept fraction, for the predictor, random scores and the hidden-state L2 norm.
2. WikiText-2 test perplexity of the protected last 10% of each ``window_len``-token window
   (non-overlapping windows from the start of the file) given a dense or pruned prefill, at the
   config's schedule: dense, SDTP predictor, random, hidden-norm (and the oracle if asked).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from sdtp.config import build_schedule, compose
from sdtp.engine.pruner import TokenPruner
from sdtp.labels import load_labels
from sdtp.models import load_model
from sdtp.predictor import TokenPredictor
from sdtp.scorers.norm import HiddenNormScorer
from sdtp.scorers.oracle import OracleScorer
from sdtp.scorers.predictor import PredictorScorer
from sdtp.scorers.random import RandomScorer
from sdtp.training.validation import ranking_agreement, recent_perplexity
from sdtp.utils import set_threads, write_json_atomic


def wikitext_windows(tokenizer, path: Path, count: int, length: int) -> list[torch.Tensor]:
    text = "\n\n".join(path.read_text().split("\n")[: 400 * count])  # enough lines for `count` windows
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    return [ids[i * length : (i + 1) * length] for i in range(min(count, len(ids) // length))]


def main(argv: list[str]) -> dict:
    extra = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv if a.startswith("+")}
    cfg = compose("train", [a for a in argv if not a.startswith("+")])
    set_threads(cfg.threads)
    schedule = build_schedule(cfg)
    model, tokenizer = load_model(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.eval()
    predictor_dir = extra.get("predictor", f"{cfg.paths.predictors_dir}/{cfg.model.name}")
    predictor = TokenPredictor.load(predictor_dir, hidden_size=model.config.hidden_size, layers=list(schedule.layers),
                                    base_model=cfg.model.name).eval()
    _, items = load_labels(cfg.train.labels_dir)
    held_out = items[-int(cfg.train.val_sequences):]
    generator = torch.Generator()

    def random_fn(stage, hidden, ids):
        generator.manual_seed(stage * 7919 + int(ids.sum()))
        return torch.rand(hidden.shape[:2], generator=generator)

    score_fns = {"sdtp": lambda s, h, ids: predictor(s, h), "random": random_fn,
                 "norm": lambda s, h, ids: h.float().norm(dim=-1)}
    result: dict = {"model": cfg.model.name, "layers": list(schedule.layers),
                    "keep_fractions": list(schedule.keep_fractions), "predictor": str(predictor_dir),
                    "held_out_sequences": len(held_out), "ranking": {}, "wikitext": {}}
    for name, fn in score_fns.items():
        metrics = ranking_agreement(model, held_out, schedule, fn)
        result["ranking"][name] = {k: round(v, 4) for k, v in metrics.items()}
        print(name, "spearman", round(metrics["spearman"], 3), "topk", round(metrics["topk_overlap"], 3), file=sys.stderr)

    windows = wikitext_windows(tokenizer, Path(cfg.paths.data_dir) / "lm" / "wiki.test.raw",
                               int(extra.get("windows", 16)), int(extra.get("window_len", 512)))
    scorers = {"dense": None, "sdtp": PredictorScorer(predictor=predictor), "random": RandomScorer(0),
               "norm": HiddenNormScorer()}
    if extra.get("oracle", "false") == "true":
        scorers["oracle"] = OracleScorer()
    for name, scorer in scorers.items():
        start = time.perf_counter()
        pruner = TokenPruner(schedule, scorer) if scorer is not None else None
        ppl = recent_perplexity(model, windows, pruner, schedule)
        result["wikitext"][name] = {**{k: round(v, 4) for k, v in ppl.items()}, "seconds": round(time.perf_counter() - start, 1)}
        print(name, "ppl", round(ppl["ppl"], 3), file=sys.stderr)
    result["wikitext_protocol"] = {"windows": len(windows), "window_len": int(extra.get("window_len", 512)),
                                   "scored": "next-token NLL at the protected last 10% of each window"}
    if "out" in extra:
        write_json_atomic(extra["out"], result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
