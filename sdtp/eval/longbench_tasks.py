"""LongBench v1 task table: prompt template, generation length, metric and category per dataset.

The values reproduce THUDM/LongBench v1 ``config/dataset2prompt.json``, ``config/dataset2maxlen.json``
and the ``dataset2metric`` map of ``eval.py``; ``NO_CHAT_DATASETS`` is the list in ``pred.py`` of
datasets whose prompt is *not* wrapped in the chat template (few-shot and code completion), and
``FIRST_LINE_DATASETS`` the ones whose prediction is cut to its first line before scoring.
Categories follow the LongBench paper (the SDTP paper's Table 1 columns are the English ones).
The narrativeqa template is the corrected release ("as concisely"); early copies read "asconcisely".
"""

from __future__ import annotations

from dataclasses import dataclass

_QA_PASSAGES = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    "based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
    "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
)
_NARRATIVE_RULES = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."


@dataclass(frozen=True)
class LongBenchDataset:
    name: str
    category: str
    metric: str  # key of sdtp.eval.longbench_metrics.METRICS
    max_new_tokens: int
    prompt: str  # str.format template over the jsonl record ({context}, {input})


DATASETS: dict[str, LongBenchDataset] = {d.name: d for d in [
    LongBenchDataset("narrativeqa", "single_doc_qa", "qa_f1", 128,
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        f"{_NARRATIVE_RULES}\n\nStory: {{context}}\n\nNow, answer the question based on the story {_NARRATIVE_RULES}"
        "\n\nQuestion: {input}\n\nAnswer:"),
    LongBenchDataset("qasper", "single_doc_qa", "qa_f1", 128,
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}\n\n"
        f"Article: {{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\n"
        "Question: {input}\n\nAnswer:"),
    LongBenchDataset("multifieldqa_en", "single_doc_qa", "qa_f1", 64,
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    LongBenchDataset("multifieldqa_zh", "single_doc_qa", "qa_f1_zh", 64,
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答："),
    LongBenchDataset("hotpotqa", "multi_doc_qa", "qa_f1", 32, _QA_PASSAGES),
    LongBenchDataset("2wikimqa", "multi_doc_qa", "qa_f1", 32, _QA_PASSAGES),
    LongBenchDataset("musique", "multi_doc_qa", "qa_f1", 32, _QA_PASSAGES),
    LongBenchDataset("dureader", "multi_doc_qa", "rouge_zh", 128,
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答："),
    LongBenchDataset("gov_report", "summarization", "rouge", 512,
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    LongBenchDataset("qmsum", "summarization", "rouge", 512,
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one "
        "or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
        "in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    LongBenchDataset("multi_news", "summarization", "rouge", 512,
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"),
    LongBenchDataset("vcsum", "summarization", "rouge_zh", 512,
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结："),
    LongBenchDataset("trec", "few_shot", "classification", 64,
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}"),
    LongBenchDataset("triviaqa", "few_shot", "qa_f1", 32,
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}"),
    LongBenchDataset("samsum", "few_shot", "rouge", 128,
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}"),
    LongBenchDataset("lsht", "few_shot", "classification", 64, "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}"),
    LongBenchDataset("passage_count", "synthetic", "count", 32,
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read "
        "these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other "
        "words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of "
        "unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, "
        "2, 3, and so on.\n\nThe final answer is: "),
    LongBenchDataset("passage_retrieval_en", "synthetic", "retrieval", 32,
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract "
        "is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the "
        "paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc."
        "\n\nThe answer is: "),
    LongBenchDataset("passage_retrieval_zh", "synthetic", "retrieval_zh", 32,
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    LongBenchDataset("lcc", "code", "code_sim", 64, "Please complete the code given below. \n{context}Next line of code:\n"),
    LongBenchDataset("repobench-p", "code", "code_sim", 64,
        "Please complete the code given below. \n{context}{input}Next line of code:\n"),
]}

# pred.py: "chat models are better off without build prompts on these tasks".
NO_CHAT_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# eval.py: predictions of these datasets are cut to their first line before scoring.
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})
# pred.py: samsum also stops at a newline and must generate at least one token.
NEWLINE_STOP_DATASETS = frozenset({"samsum"})
# The 16 English datasets; the SDTP paper (Table 1) uses the 14 non-synthetic ones.
CHINESE = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
ENGLISH = tuple(n for n in DATASETS if n not in CHINESE)
PAPER_TABLE1 = tuple(n for n in ENGLISH if DATASETS[n].category != "synthetic")
CATEGORIES = ("single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic", "code")
