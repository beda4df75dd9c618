"""SDTP token predictor: one small MLP per pruning stage, scoring tokens from hidden states.

Per stage: Linear(d [+ f], d*hidden_ratio) -> GELU -> Linear(d*hidden_ratio, 2), the two outputs
being (keep, drop) logits as in DynamicViT. The scalar importance used for ranking, for the MSE to
the saliency labels and for top-k selection at inference is ``keep - drop`` (the log-odds of keeping).

Optional position features (``position_features``, f = 2 inputs appended to the normalised hidden
state): ``log(1 + distance to the prompt's last token) / 8`` (recency in tokens, comparable across
prompt lengths) and ``position / prompt length`` (relative place in the prompt). They let the
predictor learn recency, which a hidden state alone encodes only weakly.

Optional norm feature (``norm_feature``, one more input): ``log`` of the hidden state's RMS, taken
before the input normalisation removes it. Tokens with massive activations (attention sinks such as
delimiters and newlines) are recognisable by their norm alone, which is what the training-free ``norm``
scorer keeps; with ``input_norm`` the MLP would otherwise never see it.

Optional lexical feature (``lexical_feature``, one more input, after the norm feature):
``log(1 + query match)`` of each token, the training-free lexical scorer's value
(:func:`sdtp.scorers.lexical.query_match` over the prompt, its default settings): how strongly the text
around the token shares rare words with the prompt's last tokens. A causal hidden state cannot see the
question that ends a long-document prompt; this input hands the MLP that match, to combine with what
the state does show, instead of the fixed blend of the ``lexical`` prior.

Optional context input (``context_window`` = w > 0, ``hidden_size`` more inputs, last): the mean of the
MLP's state input (normalised with ``input_norm``) over the alive prompt tokens within w original positions
either side of the token (itself included). A per-token MLP scores one state; this lets it score a token by
its phrase as well (e.g. keep a name's whole span), the learned counterpart of pooling its scores
(:mod:`sdtp.scorers.pooling`). Windows are in original positions, so masked training (all positions,
an ``alive`` mask) and physical pruning (the alive tokens only) average over the same tokens.

Optional query branch (``query_tokens`` = m > 0): a low-rank bilinear relevance of each token to the
alive tokens among the prompt's last m positions (the question of a chat prompt, the text the continuation
follows; protected, so alive, whenever m is within the recent 10%),
``logsumexp_t (K x_j) . (Q x_t) / sqrt(r) - log |T|`` added to the keep logit. The MLP scores one
token from its own state; the labels (where the continuation will attend) depend on what the prompt
ends with, which only this term can see. ``Q`` starts at zero, so the term starts at exactly 0 and a
warm start from a predictor without it scores as that predictor did.

The predictor always computes in its own parameter dtype (fp32 master weights): the hidden states
are cast to it, so a bf16 model never changes the trained weights and export equals the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sdtp.errors import ConfigError
from sdtp.scorers.pooling import box_sum
from sdtp.utils import atomic_path, write_text_atomic

WEIGHTS_FILE = "predictor.safetensors"
META_FILE = "predictor.json"


@dataclass
class PredictorMeta:
    """What a checkpoint was trained for; checked when it is loaded into a model."""

    hidden_size: int
    layers: list[int]
    hidden_ratio: float = 0.25
    base_model: str = ""
    num_layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Parameter-free RMS normalisation of the input hidden states. LLM residual streams carry
    # "massive activations" (a few tokens with norms 100x the rest) that otherwise dominate the
    # MLP's output scale; off by default so older checkpoints load unchanged.
    input_norm: bool = False
    position_features: bool = False  # append position_features() to the input (older checkpoints: off)
    norm_feature: bool = False  # append log RMS of the raw hidden state (older checkpoints: off)
    lexical_feature: bool = False  # append log(1 + lexical query match) (older checkpoints: off)
    context_window: int = 0  # w > 0: append context_mean() over w positions each side (older checkpoints: 0)
    # Weight of the recency prior the scorer blends in at inference (sdtp/scorers/prior.py), chosen
    # on validation data after training; 0 = raw predictor scores (older checkpoints).
    recency_weight: float = 0.0
    # The weight for chat prompts (ending with the chat template's generation prompt), chosen on chat
    # validation cells; None = ``recency_weight`` for every prompt.
    recency_weight_chat: float | None = None
    # Weights of the hidden-state-norm prior (sdtp/scorers/prior.py), the same way; 0 = none.
    norm_weight: float = 0.0
    norm_weight_chat: float | None = None
    # Weights of the attention prior (attention from the prompt's last ``attention_queries`` tokens at
    # the layer before each stage, sdtp/scorers/prior.py), the same way; 0 = none.
    attention_weight: float = 0.0
    attention_weight_chat: float | None = None
    attention_queries: int = 16
    # Weights of the lexical query-match prior (sdtp/scorers/lexical.py), the same way; 0 = none.
    lexical_weight: float = 0.0
    lexical_weight_chat: float | None = None
    query_tokens: int = 0  # m: the query branch reads the alive tokens among the prompt's last m (0 = none)
    query_rank: int = 32  # r: width of the bilinear key/query projections


NUM_POSITION_FEATURES = 2


def distance_to_prompt_end(positions: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """(B, n) original positions, (B,) prompt lengths -> (B, n) float tokens to the prompt's last token.

    Positions at or past the prompt end (a training continuation) get distance 0.
    """
    length = prompt_len.to(positions.device, torch.float32)[:, None].clamp(min=1)
    return (length - 1 - positions.float()).clamp(min=0)


def position_features(positions: torch.Tensor, prompt_len: torch.Tensor) -> torch.Tensor:
    """(B, n) original positions, (B,) prompt lengths -> (B, n, 2) features (see module docstring).

    Positions at or past the prompt end (a training continuation) get distance 0 and relative 1.
    """
    length = prompt_len.to(positions.device, torch.float32)[:, None].clamp(min=1)
    distance = distance_to_prompt_end(positions, prompt_len)
    return torch.stack([torch.log1p(distance) / 8.0, (positions.float() / length).clamp(max=1.0)], dim=-1)


def context_mean(normed: torch.Tensor, positions: torch.Tensor, prompt_len: torch.Tensor,
                 alive: torch.Tensor | None, window: int) -> torch.Tensor:
    """(B, n, d) states (the MLP's input) at (B, n) original positions -> (B, n, d) mean of the states of the alive
    prompt tokens (``alive`` (B, n) bool, None = all; positions < ``prompt_len`` (B,)) within ``window``
    positions either side. The alive states are scattered to their positions, box-summed, and read back."""
    batch, _, dim = normed.shape
    weight = positions < prompt_len.to(positions.device)[:, None]
    if alive is not None:
        weight = weight & alive
    index = positions.clamp(min=0)
    length = int(index.max()) + 1
    # where, not a product with the 0/1 weight: a padding slot's non-finite state must not reach the sums.
    kept = torch.where(weight[..., None], normed, 0.0)
    weight = weight.to(normed.dtype)[..., None]
    sums = normed.new_zeros(batch, length, dim).scatter_add_(1, index[..., None].expand(-1, -1, dim), kept)
    counts = normed.new_zeros(batch, length, 1).scatter_add_(1, index[..., None], weight)
    sums, counts = box_sum(sums, window), box_sum(counts, window)
    return (sums / counts.clamp(min=1)).gather(1, index[..., None].expand(-1, -1, dim))


def input_columns(meta: PredictorMeta) -> list[str]:
    """Names of the inputs appended after the hidden state, in the order ``fc1`` reads them."""
    return (["position"] * NUM_POSITION_FEATURES if meta.position_features else []) + \
        (["norm"] if meta.norm_feature else []) + (["lexical"] if meta.lexical_feature else []) + \
        (["context"] * meta.hidden_size if meta.context_window else [])


def widen_inputs(state: dict[str, torch.Tensor], old: PredictorMeta, new: PredictorMeta) -> dict[str, torch.Tensor]:
    """A state dict of a predictor described by ``old`` -> the same for ``new``, whose extra inputs are a
    superset: every stage's ``fc1`` gets a zero-weight column for each input ``old`` lacks, so the widened
    predictor scores exactly as the original until it is trained."""
    before, after = input_columns(old), input_columns(new)
    if [c for c in after if c in before] != before:
        raise ValueError(f"predictor inputs {before} are not a subset of {after}")
    out = dict(state)
    for key, weight in state.items():
        if key.endswith("fc1.weight"):
            hidden = weight.shape[1] - len(before)
            columns, source = [weight[:, :hidden]], iter(weight[:, hidden:].T)
            for name in after:
                columns.append(next(source)[:, None] if name in before else weight.new_zeros(weight.shape[0], 1))
            out[key] = torch.cat(columns, dim=1)
    return out


def select_stages(state: dict[str, torch.Tensor], old_layers: list[int], new_layers: list[int]
                  ) -> dict[str, torch.Tensor]:
    """A state dict of a predictor with stages before ``old_layers`` -> one with stages before
    ``new_layers``, each new stage taking the old stage of the same layer. Valid because a stage's
    weights score the hidden state entering its layer, whatever the other stages keep; so a
    predictor can warm-start another schedule whose layers it covers. ValueError naming the layers
    it does not cover."""
    uncovered = [layer for layer in new_layers if layer not in old_layers]
    if uncovered:
        raise ValueError(f"it has stages before layers {list(old_layers)}, not before {uncovered}")
    target = {old_layers.index(layer): new for new, layer in enumerate(new_layers)}  # old stage -> new stage
    out = {}
    for key, value in state.items():
        group, index, rest = key.split(".", 2)  # "stages.3.fc1.weight"
        if int(index) in target:
            out[f"{group}.{target[int(index)]}.{rest}"] = value
    return out


def query_slots(positions: torch.Tensor, prompt_len: torch.Tensor, alive: torch.Tensor | None,
                m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The query set: each row's alive tokens among its prompt's last ``m`` positions.

    Args:
        positions: (B, n) original positions; prompt_len: (B,); alive: (B, n) bool or None (all alive).
    Returns:
        index (B, k) slots into n, k = min(m, n); ok (B, k) bool, False where a row has fewer than k.
    """
    prompt_len = prompt_len.to(positions.device)[:, None]
    member = (positions < prompt_len) & (positions >= prompt_len - m)
    if alive is not None:
        member = member & alive
    rank = torch.where(member, positions, torch.full_like(positions, -1))
    values, index = rank.topk(min(m, positions.shape[1]), dim=1)
    return index, values >= 0


class QueryBranch(nn.Module):
    """Bilinear relevance of every token to the query tokens. (B, n, d), query set -> (B, n)."""

    def __init__(self, in_features: int, rank: int) -> None:
        super().__init__()
        self.key = nn.Linear(in_features, rank, bias=False)
        self.query = nn.Linear(in_features, rank, bias=False)
        nn.init.zeros_(self.query.weight)  # the branch starts at exactly 0 (warm starts keep their scores)

    def forward(self, x: torch.Tensor, index: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """x: (B, n, d); index, ok: (B, k) from :func:`query_slots` -> (B, n) smooth max over queries."""
        queries = self.query(torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1])))  # (B, k, r)
        logits = self.key(x) @ queries.transpose(1, 2) / self.key.out_features ** 0.5  # (B, n, k)
        logits = logits.masked_fill(~ok[:, None, :], float("-inf"))
        count = ok.sum(1, keepdim=True).clamp(min=1).to(x.dtype)  # (B, 1)
        # logsumexp - log count: the mean of exp (0 at init); rows without queries get 0.
        out = torch.logsumexp(logits, dim=-1) - torch.log(count)
        return torch.where(ok.any(1, keepdim=True), out, torch.zeros_like(out))


class StageMLP(nn.Module):
    """Linear(d, h) -> GELU -> Linear(h, 2). Input (B, n, d) -> logits (B, n, 2)."""

    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def depth_problems(meta: PredictorMeta, num_layers: int | None) -> list[str]:
    """Why a checkpoint cannot serve a ``num_layers``-layer model (none when it can, or the depth is unknown).

    The base model's name is often unrecorded (older checkpoints, models built in code), and many models
    share a hidden size: the depth and the stage layers are what still tell another model's predictor apart."""
    if num_layers is None:
        return []
    problems = []
    if meta.num_layers and meta.num_layers != num_layers:  # 0: an older checkpoint that did not record it
        problems.append(f"trained for a model of {meta.num_layers} layers, model has {num_layers}")
    outside = [layer for layer in meta.layers if layer >= num_layers]
    if outside:
        problems.append(f"stage layers {outside} lie outside the {num_layers}-layer model")
    return problems


class TokenPredictor(nn.Module):
    """The stack of per-stage predictors. ``meta.layers[s]`` is the layer stage ``s`` prunes before."""

    def __init__(self, meta: PredictorMeta) -> None:
        super().__init__()
        self.meta = meta
        width = max(2, int(round(meta.hidden_size * meta.hidden_ratio)))
        extra = len(input_columns(meta))
        self.stages = nn.ModuleList(StageMLP(meta.hidden_size + extra, width) for _ in meta.layers)
        if meta.query_tokens < 0 or meta.query_rank < 1:
            raise ConfigError(f"predictor: query_tokens must be >= 0 and query_rank >= 1, got "
                              f"{meta.query_tokens} / {meta.query_rank}")
        self.queries = nn.ModuleList(QueryBranch(meta.hidden_size, meta.query_rank) for _ in meta.layers
                                     ) if meta.query_tokens else None

    def logits(self, stage: int, hidden_states: torch.Tensor, positions: torch.Tensor | None = None,
               prompt_len: torch.Tensor | None = None, alive: torch.Tensor | None = None,
               lexical: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, d) -> (B, n, 2) keep/drop logits, computed in the predictor's dtype.

        Args:
            positions: (B, n) original positions; prompt_len: (B,) prompt lengths. Required when
                the predictor uses position features, the context input or the query branch, ignored otherwise.
            alive: (B, n) bool, the tokens still present (None = all): the query branch and the context input
                read only alive tokens, so masked training sees what physical pruning leaves.
            lexical: (B, n) query match of each token (:func:`sdtp.scorers.lexical.query_match`);
                required when the predictor uses the lexical feature, ignored otherwise.
        """
        weight = self.stages[stage].fc1.weight
        x = hidden_states.to(weight.dtype)
        mean_square = x.pow(2).mean(-1, keepdim=True) + 1e-6
        normed = x * torch.rsqrt(mean_square) if self.meta.input_norm else x
        features = [normed]
        uses_positions = self.meta.position_features or self.meta.context_window or self.queries is not None
        if uses_positions and (positions is None or prompt_len is None):
            raise ValueError("this predictor uses token positions: pass positions and prompt_len")
        if self.meta.position_features:
            features.append(position_features(positions, prompt_len).to(x.dtype))
        if self.meta.norm_feature:
            features.append(0.5 * torch.log(mean_square))  # log RMS
        if self.meta.lexical_feature:
            if lexical is None:
                raise ValueError("this predictor uses the lexical feature: pass lexical (the query match)")
            features.append(torch.log1p(lexical.to(x.dtype).clamp(min=0))[..., None])
        if self.meta.context_window:
            features.append(context_mean(normed, positions, prompt_len, alive, self.meta.context_window))
        logits = self.stages[stage](torch.cat(features, dim=-1) if len(features) > 1 else features[0])
        if self.queries is None:
            return logits
        index, ok = query_slots(positions, prompt_len, alive, self.meta.query_tokens)
        relevance = self.queries[stage](normed, index, ok)
        return torch.stack([logits[..., 0] + relevance, logits[..., 1]], dim=-1)

    def forward(self, stage: int, hidden_states: torch.Tensor, positions: torch.Tensor | None = None,
                prompt_len: torch.Tensor | None = None, alive: torch.Tensor | None = None,
                lexical: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, d) -> (B, n) importance score = keep logit - drop logit (arguments as :meth:`logits`)."""
        logits = self.logits(stage, hidden_states, positions, prompt_len, alive, lexical)
        return logits[..., 0] - logits[..., 1]

    def num_flops_per_token(self) -> int:
        """Multiply-adds x2 of one stage for one token (the predictor's own cost)."""
        mlp = self.stages[0]
        flops = 2 * (mlp.fc1.in_features * mlp.fc1.out_features + mlp.fc2.in_features * mlp.fc2.out_features)
        if self.queries is not None:  # key projection + one dot product per query token
            flops += 2 * self.meta.query_rank * (self.meta.hidden_size + self.meta.query_tokens)
        if self.meta.context_window:  # scatter, cumulative sum, window difference and mean: ~4 ops per channel
            flops += 4 * self.meta.hidden_size
        return flops

    def save(self, directory: str | Path) -> Path:
        """Write ``predictor.safetensors`` + ``predictor.json`` atomically into ``directory``.

        Each file is replaced atomically, and the description goes first and comes back last: a save
        killed in between leaves a folder that :meth:`load` refuses, never new weights read with an
        earlier predictor's description (its recency/norm prior weights, features)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        (directory / META_FILE).unlink(missing_ok=True)
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        write_text_atomic(directory / META_FILE, json.dumps(asdict(self.meta), indent=2) + "\n")
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        hidden_size: int | None = None,
        layers: list[int] | tuple[int, ...] | None = None,
        base_model: str | None = None,
        num_layers: int | None = None,
        subset: bool = False,
        key: str = "pruning.scorer.path",
    ) -> TokenPredictor:
        """Load a checkpoint, failing clearly if it was trained for another model or schedule.

        ``hidden_size`` / ``num_layers``: the model's; its stage layers must also lie inside the model.
        ``subset``: a schedule whose ``layers`` are a subset of the checkpoint's gets a predictor with
        only the stages before those layers (:func:`select_stages`) instead of an error.
        ``key``: the config key that named ``directory``, which the errors name (``train.init_from`` for a warm start).
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise ConfigError(
                f"{key}: no predictor checkpoint at {directory} (expected {META_FILE}); "
                f"train one with `sdtp-train` or point {key} at a trained predictor"
            )
        try:
            meta = PredictorMeta(**json.loads(meta_path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"{key}: {meta_path} is not a valid predictor description ({exc})") from exc
        problems = []
        if base_model is not None and meta.base_model and meta.base_model != base_model:
            problems.append(f"trained for base model {meta.base_model!r}, not {base_model!r}")
        if hidden_size is not None and meta.hidden_size != hidden_size:
            problems.append(f"hidden size {meta.hidden_size} != model hidden size {hidden_size}")
        problems += depth_problems(meta, num_layers)
        chosen = None if layers is None or list(meta.layers) == list(layers) else list(layers)
        if chosen is not None and not (subset and set(chosen) <= set(meta.layers)):
            hint = "" if subset else " (pruning.scorer.select_stages=true uses its stages at a subset of them)"
            problems.append(f"trained for stage layers {meta.layers}, schedule uses {chosen}{hint}")
        if problems:
            raise ConfigError(f"{key}: predictor at {directory} does not fit: " + "; ".join(problems))
        weights = directory / WEIGHTS_FILE
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types for truncated/missing files
            raise ConfigError(f"{key}: cannot load {weights} ({exc})") from exc
        if chosen is not None:
            state, meta = select_stages(state, list(meta.layers), chosen), replace(meta, layers=chosen)
        predictor = cls(meta)
        try:
            predictor.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"{key}: {weights} does not match {META_FILE} ({exc})") from exc
        return predictor
