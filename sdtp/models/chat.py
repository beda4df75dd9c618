"""The token ids a chat prompt ends with: the tokenizer's generation prompt (e.g. ``<|im_start|>assistant\\n``).

The SDTP scorer's recency prior weighs raw-text and chat prompts differently (:mod:`sdtp.scorers.prior`);
it recognises a chat prompt by these ids at its end.
"""

from __future__ import annotations

from typing import Any


def generation_suffix(tokenizer: Any) -> tuple[int, ...] | None:
    """The ids the chat template appends for ``add_generation_prompt=True``; None without a template.

    Found as the tail by which a one-message conversation rendered with the generation prompt
    extends the same conversation rendered without it.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "x"}]
    ids = [tuple(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen),
                           add_special_tokens=False).input_ids) for gen in (False, True)]
    without, with_prompt = ids
    if len(with_prompt) <= len(without) or with_prompt[: len(without)] != without:
        return None  # the template does not simply append a generation prompt
    return with_prompt[len(without):]
