"""Offline loaders for the lm-eval task YAMLs in this folder (``custom_dataset: !function offline.<name>``).

Each loader reads one file of the offline data mirror (``<data_root>/<file>``; see
``../shared/data/README.md``) and rebuilds the Hugging Face schema that lm-eval's built-in task of
the same name expects, so the YAMLs can use lm-eval's own prompt templates, choices and metrics.
``data_root`` comes from lm-eval metadata (``--metadata '{"data_root": "/abs/path/mc"}'``, or
``TaskManager(metadata=...)``), else ``$SDTP_DATA_DIR/mc``, else ``<repo>/../shared/data/mc``.

lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; metadata also carries the model
arguments, hence the ``**_``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets
# lm-eval's own helpers, re-exported for the YAMLs of this folder (``!function offline.<name>``).
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.mathqa.utils import doc_to_choice as mathqa_doc_to_choice  # noqa: F401
from lm_eval.tasks.super_glue.cb.aggregate import cb_multi_fi as cb_multi_f1  # noqa: F401
from lm_eval.tasks.super_glue.wsc.preprocess_wsc import default_doc_to_text as wsc_doc_to_text  # noqa: F401

DEFAULT_ROOT = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mc"


def data_root(root: str | None = None) -> Path:
    """The folder holding the multiple-choice jsonl files."""
    if root:
        return Path(root)
    if os.environ.get("SDTP_DATA_DIR"):
        return Path(os.environ["SDTP_DATA_DIR"]) / "mc"
    return DEFAULT_ROOT


def _rows(file: str, root: str | None) -> list[dict[str, Any]]:
    path = data_root(root) / file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass --metadata '{{\"data_root\": \"/abs/path/to/mc\"}}' or set SDTP_DATA_DIR "
            "(online users can run lm-eval's built-in task of the same name instead)"
        )
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _split(rows: list[dict[str, Any]], name: str = "validation") -> datasets.DatasetDict:
    """One split; the YAMLs evaluate it as ``test_split`` and draw few-shot examples from it too
    (``fewshot_split`` equal to ``test_split`` is what makes lm-eval leave a document out of its own
    few-shot examples)."""
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows)})


# SuperGLUE class labels in the order of the HF ``super_glue`` ClassLabels, which lm-eval's choices follow.
CB_LABELS = ("entailment", "contradiction", "neutral")  # lm-eval: True / False / Neither
BOOL_LABELS = ("false", "true")  # lm-eval (WiC, WSC): no / yes


def _label(value: Any, names: tuple[str, ...], where: str) -> int:
    """The index of a string label in ``names`` (case-insensitive); ValueError naming the row if unknown."""
    text = str(value).lower()
    if text not in names:
        raise ValueError(f"{where}: label {value!r} is not one of {names}")
    return names.index(text)


def piqa(sdtp_file: str = "piqa.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{query: "Question: <goal>\\n", choices, gold}`` -> ``{goal, sol1, sol2, label}``."""
    rows = _rows(sdtp_file, data_root)
    return _split([{"goal": r["query"][len("Question: "):-1], "sol1": r["choices"][0], "sol2": r["choices"][1],
                    "label": int(r["gold"])} for r in rows])


def arc(sdtp_file: str = "arc_easy.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{query: "Question: <q>", choices, gold}`` -> ``{question, choices: {text, label}, answerKey}``."""
    rows = _rows(sdtp_file, data_root)
    out = []
    for r in rows:
        labels = [chr(ord("A") + i) for i in range(len(r["choices"]))]
        out.append({"question": r["query"][len("Question: "):], "choices": {"text": r["choices"], "label": labels},
                    "answerKey": labels[int(r["gold"])]})
    return _split(out)


def boolq(sdtp_file: str = "boolq.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{query: "Passage: <p>\\nQuestion: <q>?", choices: [no, yes], gold}`` -> ``{passage, question, label}``."""
    out = []
    for r in _rows(sdtp_file, data_root):
        passage, question = r["query"][len("Passage: "):].rsplit("\nQuestion: ", 1)
        out.append({"passage": passage, "question": question.removesuffix("?"), "label": int(r["gold"])})
    return _split(out)


def copa(sdtp_file: str = "copa.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{query: "<premise without period>, because|therefore", choices, gold}``: lm-eval's text once the
    mirror's comma before the connector is dropped (``copa_query``)."""
    return _split([{"query": copa_query(r["query"]), "choices": [" " + c for c in r["choices"]],
                    "label": int(r["gold"])} for r in _rows(sdtp_file, data_root)])


def copa_query(query: str) -> str:
    """``"The man turned on the faucet, therefore"`` -> ``"The man turned on the faucet therefore"``: lm-eval's
    copa prompt is the premise without its period, a space and the connector; the mirror adds a comma."""
    head, _, connector = query.rpartition(" ")
    return f"{head.removesuffix(',')} {connector}"


def winogrande(sdtp_file: str = "winogrande.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{context_options, continuation, gold}``: lm-eval's partial scoring (choices are contexts)."""
    return _split([{"context_options": r["context_options"], "continuation": r["continuation"],
                    "label": int(r["gold"])} for r in _rows(sdtp_file, data_root)])


def hellaswag(sdtp_file: str = "hellaswag_val_1k.jsonl", data_root: str | None = None,
              **_: Any) -> datasets.DatasetDict:
    """Original schema (``ctx_a, ctx_b, activity_label, endings, label``); YAML applies lm-eval's process_docs."""
    keys = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split", "split_type", "label")
    return _split([{k: (str(r[k]) if k == "label" else r[k]) for k in keys if k in r}
                   for r in _rows(sdtp_file, data_root)])


def lambada(sdtp_file: str = "lambada_openai.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``{context, continuation}`` -> ``{text}`` (lm-eval splits off the last word again)."""
    return _split([{"text": r["context"] + " " + r["continuation"]} for r in _rows(sdtp_file, data_root)])


def mathqa(sdtp_file: str = "mathqa_test.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """Already the HF schema (``Problem, options, correct, ...``); split ``test`` as lm-eval's ``mathqa``."""
    return _split(_rows(sdtp_file, data_root), name="test")


def cb(sdtp_file: str = "superglue_cb_val.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``label`` "entailment"/"contradiction"/"neutral" -> 0/1/2 (HF ``super_glue/cb``)."""
    return _split([{"premise": r["premise"], "hypothesis": r["hypothesis"], "idx": int(r["idx"]),
                    "label": _label(r["label"], CB_LABELS, f"{sdtp_file} idx {r['idx']}")}
                   for r in _rows(sdtp_file, data_root)])


def wic(sdtp_file: str = "superglue_wic_val.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """``label`` "false"/"true" -> 0/1 (HF ``super_glue/wic``); the other fields as they are."""
    keys = ("word", "sentence1", "sentence2", "start1", "start2", "end1", "end2", "idx")
    return _split([{**{k: r[k] for k in keys}, "label": _label(r["label"], BOOL_LABELS, f"{sdtp_file} idx {r['idx']}")}
                   for r in _rows(sdtp_file, data_root)])


def wsc_span(text: str, span: str, index: int) -> str:
    """A span as HF ``super_glue/wsc.fixed`` stores it (its ``_fix_wst``, in effect on the validation rows).

    A span that is not a substring of the text (8 validation rows: "The table" where the text has
    "the table") gets the case of the first letter of the text's word at ``index``, loses trailing
    periods and has newlines made spaces; a span that still does not occur is an error (HF asserts too).
    """
    if span in text:
        return span
    word = text.split()[index]
    fixed = (span[0].lower() if word[0].islower() else span[0].upper()) + span[1:]
    fixed = fixed.rstrip(".").replace("\n", " ")
    if fixed not in text:
        raise ValueError(f"WSC span {span!r} (word {index}) does not occur in {text!r}")
    return fixed


def wsc(sdtp_file: str = "superglue_wsc_val.jsonl", data_root: str | None = None, **_: Any) -> datasets.DatasetDict:
    """Raw SuperGLUE rows -> HF ``wsc.fixed``: ``target`` flattened, spans fixed, ``label`` "false"/"true" -> 0/1."""
    out = []
    for r in _rows(sdtp_file, data_root):
        t = r["target"]
        out.append({"text": r["text"], "span1_index": int(t["span1_index"]), "span2_index": int(t["span2_index"]),
                    "span1_text": wsc_span(r["text"], t["span1_text"], int(t["span1_index"])),
                    "span2_text": wsc_span(r["text"], t["span2_text"], int(t["span2_index"])),
                    "idx": int(r["idx"]), "label": _label(r["label"], BOOL_LABELS, f"{sdtp_file} idx {r['idx']}")})
    return _split(out)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    return int(doc["label"])


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return list(doc["context_options"])


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    return doc["continuation"]
