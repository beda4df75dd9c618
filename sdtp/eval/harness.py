"""``sdtp-eval eval=lm_eval``: lm-evaluation-harness ``simple_evaluate`` on the (pruned) model.

Also ``sdtp-lm-eval``: lm-eval's own CLI with the ``sdtp`` model registered and the offline tasks
on the include path, e.g.

    sdtp-lm-eval --model sdtp --model_args model=smollm2-135m,pruning=random \
        --tasks sdtp_piqa --num_fewshot 5 --limit 100

Pruned and KV-compressed runs (``kv=h2o|streaming|snapkv``) refuse tasks of lm-eval's
``loglikelihood_rolling`` type (perplexity tasks such as ``wikitext``) in :func:`validate`, before
the model is loaded: see :func:`rolling_refusal`; and ``generate_until`` tasks unless
``eval.batch_size`` is 1 (pruned log-likelihood requests batch, pruned generation does not). With a
KV policy every log-likelihood request is scored on the compressed cache of its context
(:mod:`sdtp.eval.lm_eval_model`).

Data parallel: under ``torchrun`` / ``accelerate launch`` every rank runs :func:`run`, scores its share
of the requests and receives everyone's results (:mod:`sdtp.eval.lm_eval_model`); rank 0 reports them
with the pruning statistics of every rank and writes the samples, the others return ``{}``.

In-run checkpoint (``eval.checkpoint: true``, one process): lm-eval's request cache (``simple_evaluate(...,
use_cache=<run_dir>/lm_eval_cache)``, lm-eval's ``CachingLM``: sqlite ``lm_eval_cache_rank0.db``) receives
every answer as soon as its batch is scored, and the kept-fraction records of the pruned prefills go to
``lm_eval_kept_state.json`` (:class:`sdtp.eval.kept.KeptLedger`). A killed run of the same setup
(``sdtp-eval`` keeps both files under the run's fingerprint, :mod:`sdtp.cli.evaluate`) then scores only the
requests the cache lacks, and reports the same metrics and kept fractions as an uninterrupted one
(deterministic scorers; a random scorer restarts its stream, and the KV policy's ``kv.kept_fraction`` counts
the resumed session's prefills only). ``sdtp-eval`` deletes both files once ``metrics.json`` is written.
Data parallel runs keep no checkpoint (see :func:`request_cache`).

Seeds: lm-eval's ``random_seed`` is ``cfg.seed``; numpy/torch/few-shot seeds keep lm-eval's
defaults (1234), so ``seed=0`` reproduces ``lm_eval --seed 0,1234,1234,1234`` (its default).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdtp.distributed import World, all_ranks, process_group
from sdtp.engine.pruner import TokenPruner
from sdtp.errors import ConfigError
from sdtp.eval.kept import KeptStats
from sdtp.kv.policy import build_kv_policy, kv_enabled
from sdtp.utils import read_jsonl_records, write_text_atomic

log = logging.getLogger(__name__)
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# Offline task -> file of the data mirror it reads (checked before the model is loaded).
OFFLINE_FILES = {
    "sdtp_piqa": "piqa.jsonl",
    "sdtp_arc_easy": "arc_easy.jsonl",
    "sdtp_boolq": "boolq.jsonl",
    "sdtp_copa": "copa.jsonl",
    "sdtp_winogrande": "winogrande.jsonl",
    "sdtp_hellaswag": "hellaswag_val_1k.jsonl",
    "sdtp_lambada_openai": "lambada_openai.jsonl",
    "sdtp_mathqa": "mathqa_test.jsonl",
    "sdtp_cb": "superglue_cb_val.jsonl",
    "sdtp_wic": "superglue_wic_val.jsonl",
    "sdtp_wsc": "superglue_wsc_val.jsonl",
}
ROLLING = "loglikelihood_rolling"
# The in-run checkpoint in the run directory (module docstring): lm-eval appends ``_rank<r>.db`` to the cache prefix.
CACHE_PREFIX = "lm_eval_cache"
KEPT_STATE = "lm_eval_kept_state.json"


def task_list(cfg: DictConfig) -> list[str]:
    tasks = cfg.eval.tasks
    tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
    expanded = []
    for task in tasks:
        expanded += list(OFFLINE_FILES) if task == "sdtp_offline" else [task]
    return expanded


def rolling_refusal(where: str) -> str:
    """Why a pruned model does not run lm-eval's rolling log-likelihood, prefixed by ``where`` (key or request)."""
    return (f"{where}: lm-eval's {ROLLING} (perplexity-type tasks such as wikitext) scores almost every token "
            "with a 1-token context, so a pruner has (nearly) nothing to prune: the score would silently equal the "
            "dense model's while the run reports a kept fraction below 1. For pruned perplexity use "
            "`sdtp-eval eval=perplexity` (every scored token after a full pruned context) or `eval=continuation`; "
            "run rolling tasks with pruning=none.")


def _leaf_configs(name: str, index: Mapping[str, Any], seen: set[str]) -> Iterator[tuple[str, dict | None]]:
    """(task, its YAML config or None when ``index`` does not know it) for every task ``name`` expands to.

    ``index`` is lm-eval's ``TaskManager.task_index``: groups list their members under ``task``
    (names or inline configs), tags hold their members in ``tags``; both are expanded recursively.
    """
    if name in seen:
        return
    seen.add(name)
    entry = index.get(name)
    if entry is None:
        yield name, None
        return
    kind = entry.kind.name
    if kind not in ("GROUP", "TAG"):
        yield name, dict(entry.cfg or {})
        return
    members = entry.tags if kind == "TAG" else (entry.cfg or {}).get("task", [])
    for member in [members] if isinstance(members, str | dict) else members:
        if isinstance(member, dict) and "output_type" in member:  # an inline task config inside a group
            yield str(member.get("task")), member
        elif isinstance(member, dict):
            yield from _leaf_configs(str(member.get("task")), index, seen)
        else:
            yield from _leaf_configs(str(member), index, seen)


@functools.lru_cache(maxsize=4)
def task_index(include_path: str, builtin: bool) -> Mapping[str, Any]:
    """lm-eval's ``TaskManager.task_index`` of ``include_path``, with lm-eval's built-in tasks if ``builtin``.

    Built once per process and folder: validation asks for it more than once (:func:`unknown_tasks`,
    :func:`output_types`), and the built-in index takes seconds (thousands of YAML files). Read-only.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=builtin).task_index


def output_types(tasks: list[str], include_path: str) -> dict[str, str]:
    """Output type of every task among ``tasks`` (groups and tags expanded) whose YAML config declares one.

    Reads task YAML configs only (no dataset is loaded). ``include_path`` alone is indexed first;
    lm-eval's built-in tasks (thousands of files, seconds) only when a name is not found there.
    Python-class tasks declare no output type in YAML and are not listed; the adapter refuses
    what it cannot run when their requests arrive (:class:`sdtp.eval.lm_eval_model.SDTPLM`).
    """
    def leaves(index: Mapping[str, Any]) -> list[tuple[str, dict | None]]:
        seen: set[str] = set()
        return [leaf for task in tasks for leaf in _leaf_configs(task, index, seen)]

    found = leaves(task_index(include_path, False))
    if any(config is None for _, config in found):
        found = leaves(task_index(include_path, True))
    return {name: str(config["output_type"]) for name, config in found if config and config.get("output_type")}


def unknown_tasks(tasks: list[str], include_path: str) -> list[str]:
    """The names among ``tasks`` that are neither in ``include_path`` nor lm-eval's built-in tasks, groups or tags.

    Like :func:`output_types`, lm-eval's own index (seconds) is built only when ``include_path`` lacks a name.
    """
    missing = [t for t in tasks if t not in task_index(include_path, False)]
    return [t for t in missing if t not in task_index(include_path, True)] if missing else []


def _of_type(kinds: dict[str, str], kind: str) -> list[str]:
    """The task names in ``kinds`` (name -> output type) whose output type is ``kind``, sorted."""
    return sorted(name for name, found in kinds.items() if found == kind)


def check_limit(limit: Any, tasks: list[str]) -> None:
    """``eval.limit``: null, a number > 0 (documents per task, or a fraction < 1), or {task: documents}.

    A key of {task: documents} may be a group or tag among ``tasks``: it limits each of its tasks
    (:func:`document_samples`).
    """
    if limit is None:
        return
    if isinstance(limit, Mapping):
        unknown = sorted(set(map(str, limit)) - set(tasks))
        if unknown:
            raise ConfigError(f"eval.limit: {', '.join(unknown)} not among eval.tasks ({', '.join(tasks)})")
        bad = {k: v for k, v in limit.items() if v is not None and not (isinstance(v, int) and v > 0)}
        if bad:
            raise ConfigError(f"eval.limit: per-task limits must be integers > 0 or null, got {dict(bad)}")
        return
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit > 0:
        raise ConfigError(f"eval.limit: must be a number > 0, {{task: documents}} or null, got {limit!r}")


def _leaf_tasks(loaded: Mapping[Any, Any]) -> Iterator[tuple[str, Any]]:
    """(task name, lm-eval Task) of every task in lm-eval's ``get_task_dict`` output.

    A group is a key (its ``ConfigurableGroup``, not its name) holding a dict of its members, walked recursively;
    a tag arrives already expanded into its tasks.
    """
    for key, value in loaded.items():
        if isinstance(value, Mapping):
            yield from _leaf_tasks(value)
        else:
            yield str(key), value


def document_samples(limits: Mapping[str, int | None], manager: Any) -> dict[str, list[int]]:
    """lm-eval's ``samples`` for per-task limits: the first min(limit, size) documents of each limited task.

    The same documents ``limit=n`` picks (lm-eval takes the first n in order), per task; a task not
    named, or named with null, runs in full. lm-eval's ``samples`` names tasks only, so a group or tag
    limits each of its tasks, as ``limit=n`` would; a task named itself keeps its own limit. Two groups
    or tags that give one task different limits are a ConfigError.
    """
    from lm_eval.tasks import get_task_dict

    own = {str(name): n for name, n in limits.items()}
    found: dict[str, set[int]] = {}  # task -> the limits its named groups, tags or itself give it
    sizes: dict[str, int] = {}
    for name, n in own.items():
        if n is None:
            continue
        for task, loaded in _leaf_tasks(get_task_dict([name], manager)):  # one name at a time: tags expand
            found.setdefault(task, set()).add(int(n))
            sizes[task] = len(loaded.eval_docs)
    samples = {}
    for task, ns in found.items():
        if task not in own and len(ns) > 1:
            raise ConfigError(f"eval.limit: task {task} gets different limits {sorted(ns)} from the groups or tags "
                              "that hold it; give it its own limit")
        n = own[task] if task in own else ns.pop()  # named itself (null too): that wins over its groups' limits
        if n is not None:
            samples[task] = list(range(min(int(n), sizes[task])))
    return samples


def validate(cfg: DictConfig) -> None:
    ev = cfg.eval
    tasks = task_list(cfg)
    if not tasks:
        raise ConfigError("eval.tasks: empty; e.g. eval.tasks=[sdtp_piqa,sdtp_arc_easy]")
    if ev.num_fewshot is not None and int(ev.num_fewshot) < 0:
        raise ConfigError(f"eval.num_fewshot: must be >= 0, got {ev.num_fewshot}")
    check_limit(ev.limit, tasks)
    unknown = unknown_tasks(tasks, str(ev.include_path))
    if unknown:
        raise ConfigError(f"eval.tasks: {', '.join(unknown)} is not an lm-eval task, group or tag (offline tasks: "
                          f"{', '.join(sorted(OFFLINE_FILES))}; `lm-eval ls tasks` lists the built-in ones)")
    if int(ev.batch_size) < 1:
        raise ConfigError(f"eval.batch_size: must be >= 1, got {ev.batch_size}")
    if not isinstance(ev.get("checkpoint", False), bool):  # a string such as "no" would be truthy
        raise ConfigError(f"eval.checkpoint: must be true or false, got {ev.checkpoint!r}")
    for task in tasks:
        if task in OFFLINE_FILES and not (Path(ev.data_root) / OFFLINE_FILES[task]).is_file():
            raise ConfigError(f"eval.data_root: {Path(ev.data_root) / OFFLINE_FILES[task]} not found for task {task} "
                              "(set SDTP_DATA_DIR, or use lm-eval's built-in task name online)")
        if task in OFFLINE_FILES:  # empty / non-JSON / non-UTF-8 files fail here, not inside lm-eval after loading
            read_jsonl_records(Path(ev.data_root) / OFFLINE_FILES[task], f"eval.data_root ({task})")
    pruned = cfg.pruning.get("scorer") is not None
    if pruned or kv_enabled(cfg):  # requests scored on the prefilled cache (sdtp.eval.lm_eval_model)
        what = f"pruning={cfg.pruning.name}" if pruned else f"kv={cfg.kv.method}"
        kinds = output_types(tasks, str(ev.include_path))
        rolling = _of_type(kinds, ROLLING)
        if rolling:
            raise ConfigError(rolling_refusal(f"eval.tasks ({', '.join(rolling)}) with {what}"))
        generating = _of_type(kinds, "generate_until")
        if generating and int(ev.batch_size) > 1:
            kind = "pruned" if pruned else "KV-compressed"
            raise ConfigError(f"eval.batch_size={ev.batch_size}: {kind} generation (eval.tasks "
                              f"{', '.join(generating)}) runs one prompt at a time; set eval.batch_size=1 or run "
                              "those tasks separately")


def input_files(cfg: DictConfig) -> list[Path]:
    """The data files and task YAMLs of the offline tasks the run reads (built-in online tasks are not hashed).

    The YAML is hashed because it decides the prompts (template, splits, few-shot source): a run made
    under an older YAML is recomputed, not reused.
    """
    tasks = [t for t in task_list(cfg) if t in OFFLINE_FILES]
    return ([Path(cfg.eval.data_root) / OFFLINE_FILES[t] for t in tasks]
            + [Path(cfg.eval.include_path) / f"{t}.yaml" for t in tasks])


def metric_name(key: str) -> str:
    """lm-eval's result key ``"<metric>,<filter>"`` -> ``<metric>`` for the ``none`` filter (the only one of
    log-likelihood tasks), ``<metric>/<filter>`` otherwise: a task scored under several filters (gsm8k's
    ``strict-match`` and ``flexible-extract``) reports one number per filter, which must not overwrite each other.
    """
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}/{filter_name}"


def clean_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5}`` (numbers only;
    names by :func:`metric_name`: ``{"exact_match,strict-match": 0.5}`` -> ``{"exact_match/strict-match": 0.5}``)."""
    clean = {}
    for key, value in task_results.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            clean[metric_name(key)] = float(value)
    return clean


def _write_samples(run_dir: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    """Per-document predictions: ``samples_<task>.jsonl`` (doc id, filter, target, per-choice log-likelihoods).

    lm-eval logs a document once per filter of its task; ``filter`` tells those rows apart (``none`` for
    log-likelihood tasks).
    """
    for task, rows in samples.items():
        records = ({"doc_id": row.get("doc_id"), "filter": row.get("filter"), "target": row.get("target"),
                    "resps": row.get("filtered_resps"),
                    **{m: row[m] for m in ("acc", "acc_norm", "perplexity") if m in row}} for row in rows)
        write_text_atomic(run_dir / f"samples_{task}.jsonl",
                          "".join(json.dumps(record, default=str) + "\n" for record in records))


def evaluate_lm(lm: Any, cfg: DictConfig, cache: Path | None = None) -> dict[str, Any]:
    """``simple_evaluate`` on an lm-eval LM with the ``cfg.eval`` settings; returns lm-eval's output.

    ``cache``: lm-eval's request cache prefix (``use_cache``): requests answered there are not scored again,
    new answers are added as they come. Its sqlite file is closed on return, also when the evaluation fails
    or is interrupted, so what was answered is on disk for the next run.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ev = cfg.eval
    manager = TaskManager(include_path=str(ev.include_path), metadata={"data_root": str(ev.data_root)})
    limit, samples = ev.limit, None
    if isinstance(limit, Mapping):  # per task: lm-eval takes one limit for all, or the documents of each
        limit, samples = None, document_samples(limit, manager)
    elif limit is not None:
        limit = float(limit) if float(limit) < 1 else int(limit)
    try:
        return simple_evaluate(
            model=lm,
            tasks=task_list(cfg),
            num_fewshot=ev.num_fewshot,
            limit=limit,
            samples=samples or None,
            task_manager=manager,
            random_seed=int(cfg.seed),
            bootstrap_iters=int(ev.bootstrap_iters),
            log_samples=bool(ev.log_samples),
            use_cache=None if cache is None else str(cache),
        )
    finally:
        if cache is not None:
            close_request_cache(lm)


def close_request_cache(lm: Any) -> None:
    """Flush and close the sqlite file lm-eval's CachingLM attached to ``lm`` (its writes are queued to a thread;
    a process that exits without this may lose the last ones), and detach it so nothing writes there later."""
    from lm_eval.api.model import CacheHook

    db = getattr(getattr(lm, "cache_hook", None), "dbdict", None)
    if db is not None:
        db.close()
        lm.set_cache_hook(CacheHook(None))


def request_cache(cfg: DictConfig, lm: Any, run_dir: Path) -> Path | None:
    """The in-run checkpoint's cache prefix in ``run_dir`` (and ``lm`` recording its kept fractions there), or None
    with ``eval.checkpoint: false`` or data parallel.

    Data parallel keeps none: each rank would cache only its own share, and after a resume the ranks would hand
    different request lists to :func:`sdtp.distributed.sharded_map`, whose collectives would then not match.
    """
    if not cfg.eval.get("checkpoint", False):
        return None
    if lm.world.size > 1:
        if lm.world.is_main:
            log.info("eval.checkpoint: the in-run checkpoint is single-process only; this run on %d processes "
                     "restarts from zero if interrupted", lm.world.size)
        return None
    lm.keep_records_in(run_dir / KEPT_STATE)
    return run_dir / CACHE_PREFIX


def make_lm(cfg: DictConfig, model: Any, tokenizer: Any, pruner: TokenPruner | None) -> Any:
    """The ``sdtp`` lm-eval model (:class:`sdtp.eval.lm_eval_model.SDTPLM`) with ``cfg.eval.batch_size`` and the
    ``kv`` policy (whose hooks ``sdtp-eval`` installs around the runner)."""
    from sdtp.eval.lm_eval_model import SDTPLM

    return SDTPLM(pretrained=model, tokenizer=tokenizer, pruner=pruner, kv_policy=build_kv_policy(cfg),
                  batch_size=int(cfg.eval.batch_size), max_length=int(cfg.model.max_length))


def run(cfg: DictConfig, model: Any, tokenizer: Any, pruner: TokenPruner | None, run_dir: Path) -> dict[str, Any]:
    lm = make_lm(cfg, model, tokenizer, pruner)
    out = evaluate_lm(lm, cfg, request_cache(cfg, lm, run_dir))
    kept = KeptStats.merged(all_ranks(lm.kept, lm.world))  # each rank prefilled its own share of the contexts
    if out is None or not lm.world.is_main:  # every rank has every result; rank 0 reports them
        return {}
    if cfg.eval.log_samples:
        _write_samples(run_dir, out.get("samples", {}))
    tasks = {task: clean_metrics(res) for task, res in out["results"].items()}
    return {
        "tasks": tasks,
        "n_samples": {task: n.get("effective") for task, n in out.get("n-samples", {}).items()},
        "num_fewshot": cfg.eval.num_fewshot,
        "limit": OmegaConf.to_container(cfg.eval.limit) if isinstance(cfg.eval.limit, DictConfig) else cfg.eval.limit,
        **kept.summary(),
    }


def cli_main() -> None:
    """``sdtp-lm-eval``: lm-eval's CLI with ``--model sdtp`` registered and the offline tasks included."""
    from sdtp.config import offline_by_default

    offline_by_default()  # before lm_eval imports `datasets`, which reads HF_DATASETS_OFFLINE once
    import sdtp.eval.lm_eval_model  # noqa: F401  (registers the "sdtp" model)
    from lm_eval.__main__ import cli_evaluate

    world = World.from_env()
    refuse_rank_caches(sys.argv, world)
    if "--include_path" not in sys.argv:
        sys.argv += ["--include_path", str(TASKS_DIR)]
    # Under torchrun / accelerate launch every rank joins the group SDTPLM's collectives use; NCCL when
    # GPUs are present (the launcher gives rank r GPU LOCAL_RANK), gloo otherwise.
    with process_group(world, {"backend": "auto"}, "cuda" if torch.cuda.is_available() else "cpu"):
        cli_evaluate()


def refuse_rank_caches(argv: list[str], world: World) -> None:
    """``--use_cache`` on several processes is a ConfigError, as :func:`request_cache` keeps none there.

    lm-eval gives each rank its own cache file, which holds only that rank's share of a killed run; resumed, the
    ranks would ask for different requests and :func:`sdtp.distributed.sharded_map` could not pair them.
    """
    if world.size > 1 and any(arg == "--use_cache" or arg.startswith("--use_cache=") for arg in argv):
        raise ConfigError(f"sdtp-lm-eval: --use_cache is single-process only (WORLD_SIZE={world.size}): each rank "
                          "would cache its own share of the requests, which a resumed run cannot pair")


if __name__ == "__main__":
    cli_main()
