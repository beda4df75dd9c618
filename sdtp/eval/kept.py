"""How much of each pruned prompt survived: the ``avg_kept_fraction`` every eval runner reports."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtp.engine.pruner import PrefillRecord
from sdtp.errors import ConfigError
from sdtp.utils import write_text_atomic


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


class KeptLedger:
    """This process's pruned prefills keyed by what was prefilled, kept in a JSON file as they are added.

    The in-run checkpoint of ``eval=lm_eval`` (:mod:`sdtp.eval.harness`): a resumed run skips the requests
    whose answers lm-eval's cache holds, so it prefills only the remaining contexts; the records of the
    earlier sessions come from this file, and :meth:`stats` reports every prefill as an uninterrupted run
    does. A key prefilled again (its answers were lost with the interrupted run) replaces its record
    instead of counting twice; a key prefilled n times in one session counts n times (identical generation
    requests share one cache entry, so they are all reused or all recomputed together).
    """

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        # key -> [final kept fraction, layer token fraction, prompt tokens, prefills], in first-prefill order
        self.entries: dict[str, list[float]] = self._load(path)
        self._fresh: set[str] = set()  # keys prefilled in this session
        self._dirty = False

    @staticmethod
    def _load(path: Path) -> dict[str, list[float]]:
        if not path.is_file():
            return {}
        # Refused, not ignored: the cached answers of its prefills would be reused without their records.
        refusal = f"{path}: unreadable kept-fraction checkpoint ({{}}); force=true recomputes the run"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(refusal.format(exc)) from exc
        entries = data.get("prefills") if isinstance(data, dict) and data.get("version") == KeptLedger.VERSION else None
        if not isinstance(entries, dict):
            raise ConfigError(refusal.format(f"expected version {KeptLedger.VERSION} with 'prefills'"))
        return {str(key): list(value) for key, value in entries.items()}

    @staticmethod
    def key(*parts: Any) -> str:
        """A short stable key for a prefill described by JSON-able ``parts`` (kind, token ids, ...)."""
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def add(self, key: str, record: PrefillRecord | None) -> None:
        """Record the prefill ``key`` (unwritten until :meth:`save`); a dense prefill (None) is not recorded."""
        one = KeptStats()
        one.add(record)
        if not one.final:
            return
        count = self.entries[key][3] + 1 if key in self._fresh else 1
        self._fresh.add(key)
        self.entries[key] = [one.final[0], one.per_layer[0], one.prompt_tokens[0], count]
        self._dirty = True

    def save(self) -> None:
        """Write the records atomically (a killed writer leaves the previous file), if any changed."""
        if self._dirty:
            write_text_atomic(self.path, json.dumps({"version": self.VERSION, "prefills": self.entries}) + "\n")
            self._dirty = False

    def stats(self) -> KeptStats:
        """Every recorded prefill, as :class:`KeptStats` (in first-prefill order, so sums are the same)."""
        out = KeptStats()
        for final, per_layer, tokens, count in self.entries.values():
            for _ in range(int(count)):
                out.final.append(final)
                out.per_layer.append(per_layer)
                out.prompt_tokens.append(int(tokens))
        return out
