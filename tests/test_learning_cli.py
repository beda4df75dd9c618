"""sdtp-label / sdtp-train end to end on a tiny model: resume, mismatch errors, learning signal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtp.cli import label as label_cli
from sdtp.cli import train as train_cli
from sdtp.config import build_schedule, compose
from sdtp.errors import ConfigError
from sdtp.labels import load_labels
from sdtp.models import load_model
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.training.masking import PolicyMasker

DATA = ["model=tiny-llama", "data=dolly", "data.sources.0.num_samples=10", "data.max_length=48", "threads=1"]


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labels")
    label_cli.run(compose("label", DATA + [f"out_dir={out}", "shard_size=4"]))
    return out


def _train_cfg(labels: Path, out: Path, *extra: str):
    return compose("train", DATA + [f"train.labels_dir={labels}", f"out_dir={out}", "train.val_sequences=3",
                                    "train.max_steps=4", "train.ckpt_every=2", *extra])


def test_labels_written_and_resume(labels_dir, tmp_path):
    meta, items = load_labels(labels_dir)
    assert meta["layers"] == [1, 2, 3] and len(items) == 10
    ids, sal = items[0]
    assert sal.shape == (ids.shape[0], 3) and float(sal.max()) == pytest.approx(1.0)
    # A killed run resumes at the first missing shard and reproduces it.
    copy = tmp_path / "labels"
    copy.mkdir()
    for f in labels_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "shard_00002.safetensors").unlink()
    label_cli.run(compose("label", DATA + [f"out_dir={copy}", "shard_size=4"]))
    new, old = load_file(str(copy / "shard_00002.safetensors")), load_file(str(labels_dir / "shard_00002.safetensors"))
    assert torch.equal(new["input_ids"], old["input_ids"])
    torch.testing.assert_close(new["saliency"], old["saliency"])


def test_label_config_mismatch_raises(labels_dir):
    with pytest.raises(ConfigError, match="different config"):
        label_cli.run(compose("label", DATA + [f"out_dir={labels_dir}", "shard_size=4", "saliency.target=logit"]))


def test_train_label_mismatch_raises(labels_dir, tmp_path):
    cfg = _train_cfg(labels_dir, tmp_path / "run", "pruning.layers=[1,3]", "pruning.keep_ratio=[0.8,0.6]")
    with pytest.raises(ConfigError, match="layers"):
        train_cli.run(cfg)
    with pytest.raises(ConfigError, match="labels_dir"):
        train_cli.run(_train_cfg(tmp_path / "nothing", tmp_path / "run"))


def test_resume_reproduces_uninterrupted_run(labels_dir, tmp_path):
    full = train_cli.run(_train_cfg(labels_dir, tmp_path / "full"))
    stopped = train_cli.run(_train_cfg(labels_dir, tmp_path / "split", "train.stop_at=2"))
    assert stopped["stopped"] and stopped["step"] == 2
    resumed = train_cli.run(_train_cfg(labels_dir, tmp_path / "split", "resume=true"))
    assert resumed["step"] == full["step"] == 4
    a = TokenPredictor.load(tmp_path / "full" / "predictor").state_dict()
    b = TokenPredictor.load(tmp_path / "split" / "predictor").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert {"spearman", "topk_overlap", "ppl_pruned", "ppl_dense", "spearman/0", "topk_overlap/2"} <= set(metrics)
    assert (tmp_path / "full" / "metrics.jsonl").read_text().count("\n") >= 5


def test_steps_reduce_ranking_loss(labels_dir):
    cfg = _train_cfg(labels_dir, Path("/unused"), "train.loss.ce=0", "train.loss.mse=0")
    model, _ = load_model(cfg.model)
    model.requires_grad_(False)
    _, items = load_labels(labels_dir)
    torch.manual_seed(0)
    schedule = build_schedule(cfg)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=list(schedule.layers)))
    masker = PolicyMasker(schedule, predictor, "topk", generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=1e-2)
    batch = train_cli.collate(items[:2])
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, terms = train_cli.loss_step(model, masker, batch, cfg)
        loss.backward()
        optimizer.step()
        losses.append(terms["rank"])
    assert losses[-1] < losses[0] - 0.05


def test_experiment_overrides_compose():
    base = compose("train", ["model=tiny-llama"])
    wo_rank = compose("train", ["model=tiny-llama", "experiment=sdtp_wo_rank"])
    wo_both = compose("train", ["model=tiny-llama", "experiment=sdtp_wo_rank_mse"])
    assert base.train.loss.ranking == 1.0 and base.train.loss.mse == 1.0
    assert wo_rank.train.loss.ranking == 0.0 and wo_rank.train.loss.mse == 1.0
    assert wo_both.train.loss.ranking == 0.0 and wo_both.train.loss.mse == 0.0
    assert compose("label", ["model=tiny-llama"]).saliency.absolute is True
