"""How much of each pruned prompt survived: the ``avg_kept_fraction`` every eval runner reports."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sdtp.engine.pruner import PrefillRecord


@dataclass
class KeptStats:
    """Token-weighted means over pruned prefills (a 1-token prompt does not count like a 2K one).

    ``avg_kept_fraction``: prompt tokens alive after the last stage / prompt tokens, summed over
    prefills (0.9**10 = 0.349 for the paper schedule on long prompts; higher on short ones, where
    the protected first 4 and last 10% dominate). ``avg_layer_token_fraction``: tokens processed
    per decoder layer / prompt length, averaged over layers (the prefill-FLOPs proxy). Both are 1.0
    for the dense model.
    """

    final: list[float] = field(default_factory=list)
    per_layer: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)

    def add(self, record: PrefillRecord | None) -> None:
        if record is None or not record.seq_len:
            return
        n = record.seq_len
        kept = record.kept_per_stage[-1] if record.kept_per_stage else n
        self.final.append(kept / n)
        self.per_layer.append(sum(record.tokens_per_layer) / (n * max(1, len(record.tokens_per_layer))))
        self.prompt_tokens.append(n)

    @classmethod
    def merged(cls, parts: Iterable[KeptStats]) -> KeptStats:
        """One record of every prefill in ``parts`` (e.g. each rank's share of a data-parallel evaluation)."""
        out = cls()
        for part in parts:
            out.final += part.final
            out.per_layer += part.per_layer
            out.prompt_tokens += part.prompt_tokens
        return out

    def summary(self) -> dict[str, Any]:
        if not self.final:
            return {"avg_kept_fraction": 1.0, "avg_layer_token_fraction": 1.0, "pruned_prefills": 0}
        count, total = len(self.final), sum(self.prompt_tokens)
        return {
            "avg_kept_fraction": sum(f * n for f, n in zip(self.final, self.prompt_tokens)) / total,
            "avg_layer_token_fraction": sum(f * n for f, n in zip(self.per_layer, self.prompt_tokens)) / total,
            "avg_pruned_prompt_tokens": total / count,
            "pruned_prefills": count,
        }
