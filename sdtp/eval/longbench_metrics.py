"""LongBench v1 scoring, behaviour-compatible with THUDM/LongBench ``metrics.py`` and ``eval.py``.

Every metric maps (prediction, one ground truth, all_classes) -> score in [0, 1]; a sample scores
the max over its ground truths and a dataset scores ``round(100 * mean, 2)``. Quirks of the
official code are kept on purpose because they move the published numbers:

* ROUGE-L is the ``rouge`` package's summary-level F (not ``rouge-score``); any exception, e.g.
  an empty prediction, scores 0.
* code similarity is fuzzywuzzy's ``fuzz.ratio`` as installed by LongBench's requirements (no
  python-Levenshtein): ``round(100 * difflib ratio) / 100``, on the first prediction line that
  has no ``` ` ```, ``#`` or ``//``.
* classification removes partial class matches while iterating the same list (so a match right
  after a removed one survives), and never reaches its difflib fallback (``list != 0``).
* retrieval/count: the share of numbers in the prediction that equal the answer.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sdtp.errors import ConfigError

_ZH_PUNCT = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    punct = set(string.punctuation + _ZH_PUNCT)
    return "".join("".join(ch for ch in text.lower() if ch not in punct).split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Bag-of-tokens F1."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


# The metrics that segment Chinese text with jieba (an optional dependency: only these datasets need it).
JIEBA_METRICS = frozenset({"qa_f1_zh", "rouge_zh"})


def check_dependencies(metrics: Iterable[str]) -> None:
    """Raise ConfigError before any prediction if one of ``metrics`` needs a package that is not installed."""
    needs = sorted(set(metrics) & JIEBA_METRICS)
    if needs and importlib.util.find_spec("jieba") is None:
        raise ConfigError(f"eval.datasets: the metrics {needs} of the Chinese LongBench datasets need "
                          "`pip install jieba`")


def _jieba_cut(text: str) -> list[str]:
    check_dependencies(JIEBA_METRICS)
    import jieba

    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    pred = [t for t in (normalize_zh_answer(t) for t in _jieba_cut(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(t) for t in _jieba_cut(ground_truth)) if t]
    return token_f1(pred, gold)


def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """ROUGE-L F of the ``rouge`` package (as LongBench); 0 when it raises (empty text, recursion)."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except Exception:  # noqa: BLE001 - LongBench's bare except: any failure scores 0
        return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def _number_share(prediction: str, answer: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return 0.0 if not numbers else sum(n == str(answer) for n in numbers) / len(numbers)


def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return float(_number_share(prediction, ground_truth))


def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    """Ground truth like "Paragraph 7"; the prediction's numbers must all be 7."""
    return float(_number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0]))


def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return float(_number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0]))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` (pure-Python path): 0-100 integer similarity."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzz_ratio(first_code_line, ground_truth) / 100


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_: Any) -> float:
    matches = [name for name in all_classes if name in prediction]
    # Drop classes that are strict substrings of the answer. Removing while iterating is the
    # official behaviour: the element after a removed one is skipped.
    for name in matches:
        if name in ground_truth and name != ground_truth:
            matches.remove(name)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def sample_score(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None,
                 first_line: bool = False) -> float:
    """Best score over the ground truths; ``first_line`` applies eval.py's few-shot truncation."""
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = METRICS[metric]
    return max([0.0] + [fn(prediction, gold, all_classes=all_classes or []) for gold in answers])


def dataset_score(scores: Sequence[float]) -> float:
    """eval.py's aggregate: 100 x mean, rounded to 2 decimals."""
    return round(100 * sum(scores) / len(scores), 2) if scores else float("nan")
