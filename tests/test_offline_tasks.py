"""Offline lm-eval tasks (sdtp/eval/tasks): each loader yields lm-eval's HF schema, and our task renders
exactly what lm-eval's built-in task renders for the same documents (prompt, choices, target, scores).

The built-in task is built by lm-eval itself from its own YAML; only ``datasets.load_dataset`` is
replaced, by the documents our loader rebuilt (the hub is unreachable here). No model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import lm_eval.tasks
import pytest
from lm_eval.tasks import TaskManager

from sdtp.eval.harness import OFFLINE_FILES, TASKS_DIR
from sdtp.eval.tasks import offline

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).resolve().parent
# our task -> (loader, lm-eval's built-in task, its folder under lm_eval/tasks, the split our loader returns,
#              the HF schema keys)
CASES: dict[str, tuple[Any, str, str, str, set[str]]] = {
    "sdtp_mathqa": (offline.mathqa, "mathqa", "mathqa", "test",
                    {"Problem", "Rationale", "options", "correct", "annotated_formula", "linear_formula", "category"}),
    "sdtp_cb": (offline.cb, "cb", "super_glue/cb", "validation", {"premise", "hypothesis", "idx", "label"}),
    "sdtp_wic": (offline.wic, "wic", "super_glue/wic", "validation",
                 {"word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx", "label"}),
    "sdtp_wsc": (offline.wsc, "wsc", "super_glue/wsc", "validation",
                 {"text", "span1_index", "span2_index", "span1_text", "span2_text", "idx", "label"}),
    "sdtp_piqa": (offline.piqa, "piqa", "piqa", "validation", {"goal", "sol1", "sol2", "label"}),
    "sdtp_boolq": (offline.boolq, "boolq", "super_glue/boolq", "validation", {"passage", "question", "label"}),
    "sdtp_arc_easy": (offline.arc, "arc_easy", "arc", "validation", {"question", "choices", "answerKey"}),
}
# Documents compared per task (all of CB and WSC; the first ones of the larger sets keep the test fast).
COMPARED_DOCS = 120


def _data_file(task: str) -> Path:
    path = offline.data_root() / OFFLINE_FILES[task]
    if not path.is_file():
        pytest.skip(f"offline data mirror not found: {path}")
    return path


@pytest.fixture(scope="module")
def ours() -> TaskManager:
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                       metadata={"data_root": str(offline.data_root())})


def _builtin(task: str, rebuilt: datasets.DatasetDict, monkeypatch: pytest.MonkeyPatch) -> Any:
    """lm-eval's built-in task, built from its own YAML folder, reading ``rebuilt`` as every split."""
    _, name, folder, _, _ = CASES[task]
    split = next(iter(rebuilt.values()))

    def load_dataset(path: str, name: str | None = None, **_: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict({s: split for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    manager = TaskManager(include_path=str(LM_EVAL_TASKS / folder), include_defaults=False)
    return manager.load([name])["tasks"][name]


@pytest.mark.parametrize("task", sorted(CASES))
def test_loader_yields_the_hf_schema(task):
    loader, _, _, split, keys = CASES[task]
    rebuilt = loader(data_root=str(_data_file(task).parent))
    assert list(rebuilt) == [split]
    docs = rebuilt[split]
    assert set(docs.column_names) == keys
    assert len(docs) == sum(1 for line in _data_file(task).read_text().splitlines() if line.strip())
    if "label" in keys:
        assert set(docs["label"]) <= {0, 1, 2} and len(set(docs["label"])) > 1


@pytest.mark.parametrize("task", sorted(CASES))
def test_our_task_renders_what_the_builtin_task_renders(task, ours, monkeypatch):
    loader, _, _, split, _ = CASES[task]
    rebuilt = loader(data_root=str(_data_file(task).parent))
    builtin = _builtin(task, rebuilt, monkeypatch)
    mine = ours.load([task])["tasks"][task]
    assert mine.OUTPUT_TYPE == builtin.OUTPUT_TYPE == "multiple_choice"
    assert sorted(mine.aggregation()) == sorted(builtin.aggregation())
    docs = list(mine.eval_docs)
    assert docs == list(builtin.eval_docs)  # the same documents, in the same order
    for doc in docs[:COMPARED_DOCS]:
        assert mine.doc_to_text(doc) == builtin.doc_to_text(doc)
        assert mine.doc_to_choice(doc) == builtin.doc_to_choice(doc)
        assert mine.doc_to_target(doc) == builtin.doc_to_target(doc)
        assert mine.fewshot_context(doc, 0) == builtin.fewshot_context(doc, 0)
        # The same per-choice scores give the same metrics (acc, acc_norm; CB's f1 items).
        scores = [(-1.0 - 0.5 * i, False) for i in range(len(mine.doc_to_choice(doc)))][::-1]
        assert mine.process_results(doc, scores) == builtin.process_results(doc, scores)


def test_rendered_prompts_of_one_document():
    """One document per task, rendered by our task, against the text the README row of the mirror gives."""
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_root": str(_data_file("sdtp_cb").parent)})
    tasks = manager.load([*CASES, "sdtp_copa"])["tasks"]
    copa = tasks["sdtp_copa"]
    doc = next(iter(copa.eval_docs))
    # lm-eval's copa: premise without its period, " therefore" (the mirror's comma is dropped), " " + choice.
    assert copa.doc_to_text(doc) == "The man turned on the faucet therefore"
    assert copa.doc_to_choice(doc) == [" the toilet filled with water.", " water flowed from the spout."]
    assert all(not copa.doc_to_text(d).endswith((", because", ", therefore")) for d in copa.eval_docs)
    cb = tasks["sdtp_cb"]
    doc = next(iter(cb.eval_docs))
    assert cb.doc_to_text(doc) == (f"{doc['premise']}\nQuestion: Valence was helping. True, False, or Neither?\n"
                                   "Answer:")
    assert cb.doc_to_choice(doc) == ["True", "False", "Neither"] and cb.doc_to_target(doc) == 1  # contradiction
    wsc = tasks["sdtp_wsc"]
    doc = list(wsc.eval_docs)[5]  # one of the 8 spans HF's wsc.fixed re-cases ("The table" -> "the table")
    assert doc["span1_text"] == "the table"
    assert wsc.doc_to_text(doc).endswith('Question: In the passage above, does the pronoun "*it*" refer to '
                                         '"*the table*"?\nAnswer:')
    mathqa = tasks["sdtp_mathqa"]
    doc = next(iter(mathqa.eval_docs))
    assert mathqa.doc_to_text(doc).startswith("Question: a shopkeeper sold an article")
    assert mathqa.doc_to_choice(doc) == ["38", "27.675", "30", "data inadequate", "none of these"]
    assert mathqa.doc_to_target(doc) == 0
    wic = tasks["sdtp_wic"]
    doc = next(iter(wic.eval_docs))
    assert "Is the word 'class' used in the same way" in wic.doc_to_text(doc) and wic.doc_to_target(doc) == 0


@pytest.mark.parametrize("task", sorted(OFFLINE_FILES))
def test_no_document_is_its_own_few_shot_example(task, ours):
    """Few-shot examples come from the evaluated split (the mirror has no train split), minus the document."""
    _data_file(task)
    t = ours.load([task])["tasks"][task]
    assert t.fewshot_cfg.split == t.config.test_split  # the condition under which lm-eval excludes the document
    t.set_fewshot_seed(1234)
    for doc in list(t.eval_docs)[:20]:
        shots = t.sampler.sample(n=5, eval_doc=doc)
        assert len(shots) == 5 and doc not in shots


def test_wsc_span_fix():
    text = "I put the cake away in the refrigerator. It has a lot of leftovers in it ."
    assert offline.wsc_span(text, "the refrigerator", 5) == "the refrigerator"  # already a substring
    assert offline.wsc_span(text, "The refrigerator.", 5) == "the refrigerator"  # case of the word at its index
    with pytest.raises(ValueError, match="does not occur"):
        offline.wsc_span(text, "the freezer", 5)


def test_unknown_label_is_refused(tmp_path):
    (tmp_path / "superglue_cb_val.jsonl").write_text('{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 3}\n')
    with pytest.raises(ValueError, match="idx 3: label 'maybe'"):
        offline.cb(data_root=str(tmp_path))
