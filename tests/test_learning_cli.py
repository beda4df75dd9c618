"""sdtp-label / sdtp-train end to end on a tiny model: every-layer labels, refused folders, resume,
provenance checks, bf16 training and export, learning signal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtp.cli import label as label_cli
from sdtp.cli import train as train_cli
from sdtp.config import build_schedule, compose
from sdtp.errors import ConfigError
from sdtp.labels import load_labels
from sdtp.models import load_model
from sdtp.predictor import PredictorMeta, TokenPredictor
from sdtp.saliency import saliency_scores
from sdtp.training import loop as train_loop
from sdtp.training.loop import collate, loss_step
from sdtp.training.masking import PolicyMasker

GRADIENT_LABELS = ["saliency.target=continuation"]  # the paper's grad x input labels (default: attention)
DATA = ["model=tiny-llama", "data=c4", "data.sources.0.num_samples=10", "data.max_length=48",
        "data.continuation_length=12", "threads=1"]


@pytest.fixture(scope="module")
def labels_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labels")
    label_cli.run(compose("label", DATA + [f"out_dir={out}", "shard_size=4", "batch_size=3", *GRADIENT_LABELS]))
    return out


def _train_cfg(out: Path, *extra: str, labels: Path | None = None):
    source = ["train.labels=stored", f"train.labels_dir={labels}"] if labels else []
    return compose("train", DATA + source + [f"out_dir={out}", "train.target=continuation", "train.val_sequences=3", "train.max_steps=4",
                                             "train.ckpt_every=2", "train.grad_accum=1", *extra])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_labels_at_every_layer_match_a_direct_computation(labels_dir, tmp_path):
    meta, items = load_labels(labels_dir)
    assert meta["layers"] == [0, 1, 2, 3] and len(items) == 10 and meta["saliency"]["target"] == "continuation"
    model, _ = load_model(compose("label", DATA).model)
    ids, split, sal = items[0]
    assert sal.shape == (ids.shape[0], 4) and split == ids.shape[0] - 12
    direct = saliency_scores(model, ids[None], None, "continuation", absolute=False, normalize=False,
                             split=torch.tensor([split]))[0]
    # labelled in batches of 3: each row's label is its own mean CE's, as alone (saliency.row_scale)
    torch.testing.assert_close(sal, direct, rtol=1e-3, atol=1e-3 * float(direct.abs().max()))
    # A killed run resumes at the first missing shard and reproduces it.
    copy = _copy(labels_dir, tmp_path / "labels")
    (copy / "shard_00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="2 of 3 shards"):
        load_labels(copy)  # a partial folder is refused
    label_cli.run(compose("label", DATA + [f"out_dir={copy}", "shard_size=4", "batch_size=3", *GRADIENT_LABELS]))
    new, old = load_file(str(copy / "shard_00002.safetensors")), load_file(str(labels_dir / "shard_00002.safetensors"))
    assert torch.equal(new["input_ids"], old["input_ids"])
    torch.testing.assert_close(new["saliency"], old["saliency"])


def test_shard_from_another_label_set_is_refused(labels_dir, tmp_path):
    other = tmp_path / "other"
    label_cli.run(compose("label", DATA + [f"out_dir={other}", "shard_size=4", "batch_size=3", "saliency.target=sequence"]))
    copy = _copy(labels_dir, tmp_path / "mixed")
    shutil.copy(other / "shard_00001.safetensors", copy / "shard_00001.safetensors")
    with pytest.raises(ConfigError, match="another label set"):
        load_labels(copy)
    unsigned = load_file(str(labels_dir / "shard_00000.safetensors"))
    save_file(unsigned, str(copy / "shard_00000.safetensors"))  # no meta hash at all
    with pytest.raises(ConfigError, match="another label set"):
        load_labels(copy)


def test_label_config_mismatch_raises(labels_dir):
    with pytest.raises(ConfigError, match="different config"):
        label_cli.run(compose("label", DATA + [f"out_dir={labels_dir}", "shard_size=4", "data.continuation_length=8"]))
    with pytest.raises(ConfigError, match="different config.*model"):  # a resume by another model's weights
        label_cli.run(compose("label", DATA + [f"out_dir={labels_dir}", "shard_size=4", "model.seed=7"]))


def test_a_label_folder_of_another_config_names_the_out_dir_key(tmp_path):
    """The error named ``label.out_dir``; sdtp-label's key is the top-level ``out_dir``."""
    from sdtp.labels import check_or_write_meta

    check_or_write_meta(tmp_path, {"model": "a", "target": "attention"})
    check_or_write_meta(tmp_path, {"model": "a", "target": "attention"})  # the same config resumes
    with pytest.raises(ConfigError, match=r"^out_dir: .* \(model: existing='a' vs config='b'\); "
                                          r"use another out_dir or delete it$"):
        check_or_write_meta(tmp_path, {"model": "b", "target": "attention"})
    assert "out_dir" in compose("label", ["model=tiny-llama"]) and "label" not in compose("label", ["model=tiny-llama"])


def test_train_from_labels_checks_target_and_folder(labels_dir, tmp_path):
    with pytest.raises(ConfigError, match="target"):
        train_cli.run(_train_cfg(tmp_path / "run", "train.target=fidelity", labels=labels_dir))
    with pytest.raises(ConfigError, match="labels_dir"):
        train_cli.run(_train_cfg(tmp_path / "run", labels=tmp_path / "nothing"))
    # Labels of another model's weights, or of other data, are not this run's training signal.
    with pytest.raises(ConfigError, match=r"labels were made with model\.seed=0, config has 7"):
        train_cli.run(_train_cfg(tmp_path / "run", "model.seed=7", labels=labels_dir))
    with pytest.raises(ConfigError, match=r"data\.continuation_length=12, config has 8"):
        train_cli.run(_train_cfg(tmp_path / "run", "data.continuation_length=8", labels=labels_dir))
    meta = json.loads((labels_dir / "meta.json").read_text())
    assert "name" not in meta["tokenizer"] and len(meta["tokenizer"]["vocab_sha256"]) == 16  # not the folder
    # labels at every layer serve any schedule
    summary = train_cli.run(_train_cfg(tmp_path / "run2", "pruning.layers=[1,3]", "pruning.keep_ratio=[0.8,0.6]",
                                       labels=labels_dir))
    assert TokenPredictor.load(summary["predictor"]).meta.layers == [1, 3]


def test_resume_reproduces_uninterrupted_run_and_refuses_other_setups(labels_dir, tmp_path, monkeypatch):
    full = train_cli.run(_train_cfg(tmp_path / "full", labels=labels_dir))
    stopped = train_cli.run(_train_cfg(tmp_path / "split", "train.stop_at=2", labels=labels_dir))
    assert stopped["stopped"] and stopped["step"] == 2
    with pytest.raises(ConfigError, match="optimizer"):
        train_cli.run(_train_cfg(tmp_path / "split", "resume=true", "train.optimizer.lr=0.5", labels=labels_dir))
    with pytest.raises(ConfigError, match="model"):
        train_cli.run(_train_cfg(tmp_path / "split", "resume=true", "model=tiny-qwen2", labels=labels_dir))
    # The same model name in another dtype, or laid out over more steps, is another run; the message names the key.
    with pytest.raises(ConfigError, match=r"base_model\.dtype: checkpoint='torch.float32' vs config='torch.bfloat16'"):
        train_cli.run(_train_cfg(tmp_path / "split", "resume=true", "model.dtype=bfloat16", labels=labels_dir))
    with pytest.raises(ConfigError, match=r"train\.max_steps: checkpoint=4 vs config=6"):
        train_cli.run(_train_cfg(tmp_path / "split", "resume=true", "train.max_steps=6", labels=labels_dir))
    # Another held-out cut is another training set (and would hold out examples already trained on).
    with pytest.raises(ConfigError, match=r"train\.val_sequences: checkpoint=3 vs config=2"):
        train_cli.run(_train_cfg(tmp_path / "split", "resume=true", "train.val_sequences=2", labels=labels_dir))
    # Labels of the same examples made another way (here by the model in bf16) are another training signal.
    bf16_labels = tmp_path / "bf16_labels"
    label_cli.run(compose("label", DATA + [f"out_dir={bf16_labels}", "shard_size=4", "batch_size=3",
                                           "model.dtype=bfloat16", *GRADIENT_LABELS]))
    with pytest.raises(ConfigError, match=r"data: checkpoint='\w+\+labels:\w+' vs config='\w+\+labels:\w+'"):
        train_cli.run(_train_cfg(tmp_path / "split", "resume=true", labels=bf16_labels))
    resumed = train_cli.run(_train_cfg(tmp_path / "split", "resume=true", labels=labels_dir))
    assert resumed["step"] == full["step"] == 4
    # resume=true on the finished run: nothing retrained or revalidated, its record (training time too) stands.
    record = (tmp_path / "split" / "metrics.json").read_text()
    assert train_cli.run(_train_cfg(tmp_path / "split", "resume=true", labels=labels_dir)) == resumed
    assert (tmp_path / "split" / "metrics.json").read_text() == record
    a = TokenPredictor.load(tmp_path / "full" / "predictor").state_dict()
    b = TokenPredictor.load(tmp_path / "split" / "predictor").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert {"spearman", "topk_overlap", "nll_sdtp", "nll_dense", "nll_random", "drop_agreement_mean"} <= set(metrics)
    assert len(metrics["git_commit"].removesuffix("-dirty")) == 40  # the code that trained it (REPO is a git clone)
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the resumed run does not repeat steps
    (tmp_path / "full" / "metrics.json").write_text('{"marker": 1}')  # an earlier run's record ...
    with pytest.raises(RuntimeError, match="killed"), monkeypatch.context() as patched:  # ... and a run killed early
        patched.setattr(train_loop, "held_out", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        train_cli.run(_train_cfg(tmp_path / "full", labels=labels_dir))
    assert not (tmp_path / "full" / "metrics.json").exists()  # cannot pass for the killed run's
    assert not (tmp_path / "full" / "checkpoint.pt").exists()  # nor can resume=true continue the earlier run
    train_cli.run(_train_cfg(tmp_path / "full", labels=labels_dir))  # afresh (resume=false) in a used out_dir
    steps = [r["step"] for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4]  # not appended to the earlier run's records


def test_bf16_online_training_with_validation_every_step_exports_the_checkpoint(tmp_path):
    """A bf16 model, fp32 predictor master weights, validation (which binds the predictor to the
    pruner) at every step: training keeps working and the export equals the checkpoint."""
    cfg = _train_cfg(tmp_path / "bf16", "model.dtype=bfloat16", "train.eval_every=1", "train.max_steps=3",
                     "train.loss.ce=1.0", f"export_dir={tmp_path / 'export'}")
    summary = train_cli.run(cfg)
    assert summary["step"] == 3
    checkpoint = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)["predictor"]
    exported = load_file(str(tmp_path / "export" / "predictor.safetensors"))
    assert all(v.dtype == torch.float32 for v in checkpoint.values())
    assert all(torch.equal(checkpoint[k], exported[k]) for k in checkpoint)


def test_steps_reduce_ranking_loss(labels_dir):
    cfg = _train_cfg(Path("/unused"), "train.loss.mse=0", "train.noise_scale.start=0", labels=labels_dir)
    model, _ = load_model(cfg.model)
    model.requires_grad_(False)
    _, items = load_labels(labels_dir)
    torch.manual_seed(0)
    schedule = build_schedule(cfg)
    predictor = TokenPredictor(PredictorMeta(hidden_size=64, layers=list(schedule.layers), position_features=True))
    masker = PolicyMasker(schedule, predictor, "topk", noise_scale=0.0)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=1e-2)
    batch = collate([(ids, split) for ids, split, _ in items[:2]], [sal[:, list(schedule.layers)] for *_, sal in items[:2]])
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss, terms = loss_step(model, masker, batch, cfg.train, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        losses.append(terms["rank"])
    assert losses[-1] < losses[0] - 0.05


def test_gumbel_mode_with_ratio_loss_trains(tmp_path):
    """keep_mode=gumbel with the ratio loss: the kept fraction's distance to the schedule's shrinks as it trains."""
    summary = train_cli.run(_train_cfg(tmp_path / "g", "train.keep_mode=gumbel", "train.loss.ratio=2",
                                       "train.optimizer.lr=3e-2"))
    assert summary["step"] == 4
    steps = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    ratio = [row["ratio"] for row in steps if "ratio" in row]
    assert len(ratio) == 4 and ratio[-1] < 0.5 * ratio[0]  # 0.26 -> 0.08 on this machine's tiny run
    metrics = json.loads((tmp_path / "g" / "metrics.json").read_text())
    kept = [row["kept_fraction"] for row in steps if "kept_fraction" in row]
    assert metrics["kept_fraction_final"] == pytest.approx(kept[-1])  # its last 10% of steps: the last one


def test_bad_training_config_fails_before_loading(tmp_path):
    for override, key in (("train.target=bogus", "train.target"), ("train.target=logit", "train.target"),
                          ("train.labels=maybe", "train.labels"), ("train.context_window=-1", "train.context_window"),
                          ("train.tau.end=0", "train.tau"), ("data.sources.0.path=/nope.jsonl", "data.sources.0.path")):
        with pytest.raises(ConfigError, match=key):
            train_cli.run(_train_cfg(tmp_path / "x", override))


def test_experiment_overrides_compose():
    base = compose("train", ["model=tiny-llama"])
    wo_rank = compose("train", ["model=tiny-llama", "experiment=sdtp_wo_rank"])
    wo_both = compose("train", ["model=tiny-llama", "experiment=sdtp_wo_rank_mse"])
    assert base.train.loss.ranking == 1.0 and base.train.loss.mse == 1.0
    assert wo_rank.train.loss.ranking == 0.0 and wo_rank.train.loss.mse == 1.0
    assert wo_both.train.loss.ranking == 0.0 and wo_both.train.loss.mse == 0.0


def test_init_from_starts_at_the_given_predictor(tmp_path):
    first = train_cli.run(_train_cfg(tmp_path / "a", "train.max_steps=2"))
    cfg = _train_cfg(tmp_path / "b", f"train.init_from={first['predictor']}", "train.max_steps=1",
                     "train.optimizer.lr=0.0", "train.scheduler=null")
    train_cli.run(cfg)
    a = TokenPredictor.load(first["predictor"]).state_dict()
    b = TokenPredictor.load(tmp_path / "b" / "predictor").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the fine-tune kept the initial weights
    for override, key in (("train.position_features=false", "position_features"), ("train.input_norm=false",
                          "input_norm"), ("train.hidden_ratio=0.5", "hidden_ratio")):  # cannot be widened into
        with pytest.raises(ConfigError, match=rf"has {key}=.*; set train\.{key}="):
            train_cli.run(_train_cfg(tmp_path / "c", f"train.init_from={first['predictor']}", override))


def test_init_from_warm_starts_a_schedule_from_the_stages_at_its_layers(tmp_path):
    """A predictor for stages before layers 1, 2, 3 warm-starts one for layers 2, 3 (a later first
    stage): each new stage is (lr 0) the old stage of the same layer; a layer it has no stage for is
    refused, naming the layers."""
    first = train_cli.run(_train_cfg(tmp_path / "a", "train.max_steps=2"))
    old = TokenPredictor.load(first["predictor"])
    assert old.meta.layers == [1, 2, 3]
    train_cli.run(_train_cfg(tmp_path / "b", f"train.init_from={first['predictor']}", "train.max_steps=1",
                             "pruning.layers=[2,3]", "train.optimizer.lr=0.0", "train.scheduler=null"))
    new = TokenPredictor.load(tmp_path / "b" / "predictor")
    assert new.meta.layers == [2, 3]
    x, pos, length = 3.0 * torch.randn(1, 6, old.meta.hidden_size), torch.arange(6)[None], torch.tensor([6])
    for stage, layer in enumerate(new.meta.layers):
        torch.testing.assert_close(new(stage, x, pos, length), old(old.meta.layers.index(layer), x, pos, length))
    with pytest.raises(ConfigError, match=r"not before \[1\]"):
        train_cli.run(_train_cfg(tmp_path / "c", f"train.init_from={tmp_path / 'b' / 'predictor'}",
                                 "pruning.layers=[1,3]"))


@pytest.mark.parametrize("feature, value", [("norm_feature", "true"), ("lexical_feature", "true"),
                                            ("context_window", "2")])
def test_init_from_adds_an_input_as_a_zero_column(tmp_path, feature, value):
    """A predictor without the norm (lexical, context) input warm-starts one with it: same weights plus zero
    columns (one; hidden_size for the context), so (lr 0) the widened predictor scores exactly as the original;
    training with the input runs end to end (its masked forwards and validation compute it); a checkpoint with
    the input refuses a run without it."""
    first = train_cli.run(_train_cfg(tmp_path / "a", "train.max_steps=2"))
    cfg = _train_cfg(tmp_path / "b", f"train.init_from={first['predictor']}", "train.max_steps=1",
                     f"train.{feature}={value}", "train.optimizer.lr=0.0", "train.scheduler=null")
    train_cli.run(cfg)
    old = TokenPredictor.load(first["predictor"])
    new = TokenPredictor.load(tmp_path / "b" / "predictor")
    added = old.meta.hidden_size if feature == "context_window" else 1
    assert getattr(new.meta, feature) and new.stages[0].fc1.in_features == old.stages[0].fc1.in_features + added
    assert torch.equal(new.stages[0].fc1.weight[:, -added:], torch.zeros(new.stages[0].fc1.out_features, added))
    x, pos, match = 3.0 * torch.randn(1, 6, old.meta.hidden_size), torch.arange(6)[None], torch.rand(1, 6)
    torch.testing.assert_close(new(1, x, pos, torch.tensor([6]), lexical=match), old(1, x, pos, torch.tensor([6])))
    with pytest.raises(ConfigError, match=feature):
        train_cli.run(_train_cfg(tmp_path / "c", f"train.init_from={tmp_path / 'b' / 'predictor'}"))


def test_init_from_adds_a_query_branch_that_starts_at_zero(tmp_path):
    """A predictor without the query branch warm-starts one with it; (lr 0) it scores exactly as the
    original, and a checkpoint with the branch refuses to start a predictor without it."""
    first = train_cli.run(_train_cfg(tmp_path / "a", "train.max_steps=2"))
    cfg = _train_cfg(tmp_path / "b", f"train.init_from={first['predictor']}", "train.max_steps=1",
                     "train.query_tokens=4", "train.query_rank=8", "train.optimizer.lr=0.0", "train.scheduler=null")
    train_cli.run(cfg)
    old = TokenPredictor.load(first["predictor"])
    new = TokenPredictor.load(tmp_path / "b" / "predictor")
    assert new.meta.query_tokens == 4 and new.queries[0].key.out_features == 8
    x, pos = 3.0 * torch.randn(1, 6, old.meta.hidden_size), torch.arange(6)[None]
    torch.testing.assert_close(new(1, x, pos, torch.tensor([6])), old(1, x, pos, torch.tensor([6])))
    with pytest.raises(ConfigError, match="query branch"):
        train_cli.run(_train_cfg(tmp_path / "c", f"train.init_from={tmp_path / 'b' / 'predictor'}"))


def test_lr_scale_zero_freezes_the_mlp_while_the_query_branch_trains(tmp_path):
    """train.lr_scale.stages=0: the warm-started MLPs stay bit-identical, the new query branch moves;
    a negative or unknown scale is refused."""
    first = train_cli.run(_train_cfg(tmp_path / "a", "train.max_steps=2"))
    train_cli.run(_train_cfg(tmp_path / "b", f"train.init_from={first['predictor']}", "train.max_steps=2",
                             "train.query_tokens=4", "train.query_rank=8", "train.lr_scale.stages=0.0"))
    old = TokenPredictor.load(first["predictor"]).state_dict()
    new = TokenPredictor.load(tmp_path / "b" / "predictor").state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert any(new[k].abs().sum() > 0 for k in new if k.endswith("query.weight"))  # zero at the start
    for bad in ("train.lr_scale.stages=-1.0", "+train.lr_scale.mlp=1.0", "train.lr_scale.stages=0.0"):
        with pytest.raises(ConfigError, match="lr_scale"):
            train_cli.run(_train_cfg(tmp_path / "c", bad))


def test_resumed_training_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """logger=wandb: the stopped and the resumed job open one W&B run (the id saved next to the checkpoint)."""
    import sys
    import types

    calls = []
    run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None, summary={})
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.append(kw) or run))
    train_cli.run(_train_cfg(tmp_path, "logger=wandb", "train.stop_at=2"))
    train_cli.run(_train_cfg(tmp_path, "logger=wandb", "resume=true"))
    assert len(calls) == 2 and calls[1]["id"] == calls[0]["id"] and calls[1]["resume"] == "allow"


def test_attention_labels_from_sdtp_label_match_a_direct_computation(tmp_path):
    """The default ``attention`` target through sdtp-label: stored every-layer labels equal a direct call."""
    label_cli.run(compose("label", DATA + [f"out_dir={tmp_path}", "shard_size=4", "batch_size=1"]))
    meta, items = load_labels(tmp_path)
    assert meta["saliency"]["target"] == "attention"
    model, _ = load_model(compose("label", DATA).model)
    ids, split, sal = items[0]
    direct = saliency_scores(model, ids[None], None, "attention", absolute=False, normalize=False,
                             split=torch.tensor([split]))[0]
    torch.testing.assert_close(sal, direct, rtol=1e-3, atol=1e-6)


def test_selection_loss_trains_end_to_end(tmp_path):
    """train.loss.selection: every stage logs its cut-crossing term (positive: each stage keeps some, drops some)."""
    train_cli.run(_train_cfg(tmp_path / "sel", "train.loss.selection=1", "train.loss.ranking=0", "train.loss.ce=0",
                             "train.max_steps=2"))
    rows = [r for r in map(json.loads, (tmp_path / "sel" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(rows) == 2 and all(r["sel"] > 0 and "rank" not in r for r in rows)
    stages = {k.split("/")[1] for k in rows[0] if k.startswith("mse/")}
    assert len(stages) > 1 and {k.split("/")[1] for k in rows[0] if k.startswith("sel/")} == stages


def test_held_out_tokens_rank_by_magnitude_or_by_the_signed_label(tiny_llama):
    """Validation's Spearman / top-k compare the predictor with what training ranks by: |label| for log_z and
    max, the signed label for label_transform=signed (a token whose removal helps ranks below an unused one)."""
    model = tiny_llama[0]
    schedule = build_schedule(compose("train", ["model=tiny-llama"]))
    raw = torch.linspace(-1.0, 1.0, 40)[:, None].repeat(1, len(schedule.layers))
    example = (torch.arange(4, 44), 30)
    for transform, expected in (("signed", raw), ("log_z", raw.abs()), ("max", raw.abs())):
        labels, _ = train_loop.held_out(model, schedule, [example], [raw], "mask", transform)
        assert torch.equal(labels[0], expected)
