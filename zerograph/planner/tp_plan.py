"""Which layers tensor parallelism splits, and how (policy; the
``tensor_parallel`` pass is the mechanism).

In order of precedence:

1. ``tensor_parallel.partition_config.layer_specs`` (DeepSpeed's form): each
   spec's ``patterns`` (regexes, matched against the weight's FQN and the
   layer's module path) and its ``partition_type``: ``"column"``, ``"row"``
   or ``"skip"`` (stays whole). ``"shape": [k, -1]`` declares a fused weight of
   ``k`` equal parts along the output features, ``"shape": [[q, k, v], -1]``
   one of listed part sizes. The first spec that matches a layer decides it.
2. With ``use_default_specs`` (default true), the layers no spec matched:
   the model's Hugging Face ``config.base_model_tp_plan`` (``colwise``,
   ``rowwise``, ``packed_colwise``) if it has one;
3. else the graph rule (:mod:`zerograph.planner.tp_graph_rule`) on the
   model's Dynamo graph, traced on ``example_batch``.

Only ``nn.Linear`` and Hugging Face's ``Conv1D`` (GPT-2; weight ``[in, out]``)
layers are split. A column split cuts the output features (weight and bias),
a row split the input features (the bias stays whole and is added after the
all-reduce).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable

from torch import nn

from zerograph.config import ConfigError
from zerograph.planner.tp_graph_rule import graph_rule
from zerograph.runtime.tp_layout import TpLayout

log = logging.getLogger(__name__)

_KINDS = ("column", "row", "skip")
_HF_KINDS = {"colwise": "column", "rowwise": "row", "packed_colwise": "column"}
_SECTION = "tensor_parallel.partition_config"


@dataclasses.dataclass(frozen=True)
class LayerSplit:
    """How one layer is split, and who said so."""

    module: str
    kind: str  # "column" or "row"
    parts: tuple[int, ...] | None  # fused parts of the output features (column); None: one part
    source: str  # "layer_specs[0]", "base_model_tp_plan['layers.*.mlp.up_proj']", "graph rule"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    index: int
    patterns: tuple[re.Pattern, ...]
    kind: str
    shape: object  # the spec's "shape" (fused parts), or None

    def matches(self, module: str) -> bool:
        names = (module, f"{module}.weight")
        return any(p.match(n) for p in self.patterns for n in names)


def splittable_modules(model: nn.Module) -> dict[str, str]:
    """Module path -> ``"linear"`` (``nn.Linear``, weight ``[out, in]``) or
    ``"addmm"`` (Hugging Face ``Conv1D``, weight ``[in, out]``)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = "linear"
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
                and module.weight.dim() == 2:
            out[name] = "addmm"
    return out


def parse_partition_config(config: dict | None) -> tuple[list[LayerSpec], bool]:
    """The layer specs and ``use_default_specs`` of ``partition_config``."""
    config = dict(config or {})
    unknown = set(config) - {"layer_specs", "use_default_specs"}
    if unknown:
        raise ConfigError(f"{_SECTION}: unknown key(s) {sorted(unknown)}; the keys are layer_specs, use_default_specs")
    use_default = config.get("use_default_specs", True)
    if not isinstance(use_default, bool):
        raise ConfigError(f"{_SECTION}.use_default_specs: expected true or false; got {use_default!r}")
    raw = config.get("layer_specs", [])
    if not isinstance(raw, (list, tuple)):
        raise ConfigError(f"{_SECTION}.layer_specs: expected a list of specs; got {type(raw).__name__}")
    specs = []
    for i, spec in enumerate(raw):
        key = f"{_SECTION}.layer_specs[{i}]"
        if not isinstance(spec, dict):
            raise ConfigError(f"{key}: expected an object with patterns and partition_type; got {spec!r}")
        extra = set(spec) - {"patterns", "partition_type", "shape", "partition_dim"}
        if extra:
            raise ConfigError(f"{key}: unknown key(s) {sorted(extra)}; the keys are patterns, partition_type, shape, "
                              "partition_dim")
        patterns = spec.get("patterns")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"{key}.patterns: expected a list of regexes; got {patterns!r}")
        kind = spec.get("partition_type")
        if kind not in _KINDS:
            raise ConfigError(f"{key}.partition_type: expected one of {list(_KINDS)}; got {kind!r}")
        if spec.get("partition_dim", 0) != 0:
            raise ConfigError(f"{key}.partition_dim={spec['partition_dim']!r}: only 0 (the output features of a "
                              "fused weight, as \"shape\" lists them) is supported")
        if spec.get("shape") is not None and kind != "column":
            raise ConfigError(f"{key}: \"shape\" declares fused parts of a column split; partition_type is {kind!r}")
        try:
            compiled = tuple(re.compile(p) for p in patterns)
        except re.error as exc:
            raise ConfigError(f"{key}.patterns: not a valid regex ({exc})") from None
        specs.append(LayerSpec(i, compiled, kind, spec.get("shape")))
    return specs, use_default


def _spec_parts(spec: LayerSpec, out_features: int, module: str) -> tuple[int, ...] | None:
    shape = spec.shape
    if shape is None:
        return None
    key = f"{_SECTION}.layer_specs[{spec.index}].shape"
    if not isinstance(shape, (list, tuple)) or len(shape) != 2 or shape[1] != -1:
        raise ConfigError(f"{key}={shape!r}: expected [parts, -1] or [[size, ...], -1]")
    head = shape[0]
    if isinstance(head, int) and head >= 1 and out_features % head == 0:
        return (out_features // head,) * head
    if isinstance(head, (list, tuple)) and all(isinstance(s, int) and s > 0 for s in head) and sum(head) == out_features:
        return tuple(head)
    raise ConfigError(f"{key}={shape!r} does not divide the {out_features} output features of {module}")


def hf_tp_plan(model: nn.Module) -> dict[str, str] | None:
    """The model's Hugging Face ``base_model_tp_plan``, if it has one."""
    plan = getattr(getattr(model, "config", None), "base_model_tp_plan", None)
    return dict(plan) if isinstance(plan, dict) and plan else None


def _hf_key_matches(key: str, module: str) -> bool:
    """Whether a Hugging Face tp plan key (``layers.*.mlp.up_proj``) names ``module``."""
    return re.search(r"(?:^|\.)" + re.escape(key).replace(r"\*", r"[^.]+") + "$", module) is not None


def _hf_kind(plan: dict[str, str], module: str) -> tuple[str, str] | None:
    for key, style in plan.items():
        if _hf_key_matches(key, module):
            if style not in _HF_KINDS:
                raise ConfigError(
                    f"{module}: the model's Hugging Face tp plan says {key!r}: {style!r}, which zerograph does not "
                    f"do yet (it does {', '.join(_HF_KINDS)}); give this layer a {_SECTION}.layer_specs entry")
            return _HF_KINDS[style], key
    return None


def _unknown_hf_styles(plan: dict[str, str], modules) -> dict[str, str]:
    """The entries of ``plan`` that match one of ``modules`` with a style zerograph does not do."""
    out = {}
    for key, style in plan.items():
        if style not in _HF_KINDS and any(_hf_key_matches(key, m) for m in modules):
            out[key] = style
    return out


def decide_splits(model: nn.Module, partition_config: dict | None,
                  capture: Callable[[], list] | None, vocab_parallel: bool = False) -> dict[str, LayerSplit]:
    """Module path -> :class:`LayerSplit` for every layer to split.
    ``capture()`` returns the model's Dynamo graphs for the graph rule (None:
    no example batch to trace on). ``vocab_parallel``: also the input
    embedding and the LM head, over the vocabulary (:func:`vocab_splits`)."""
    if vocab_parallel:
        hf_loss_in_graph(model)
    out = _decide_layer_splits(model, partition_config, capture, allow_none=vocab_parallel)
    if vocab_parallel:
        out.update(vocab_splits(model, out))
    return out


def hf_loss_in_graph(model: nn.Module) -> None:
    """Let Dynamo trace a Hugging Face model's loss in the graph of its logits.

    A model whose class name names no loss (``GPT2LMHeadModel``: ``loss_type``
    is None) resolves ``loss_function`` to ``ForCausalLM`` *with a logged
    warning* on every call, and Dynamo breaks the graph at a logger call: the
    loss becomes a graph of its own and the vocab-split logits would be
    gathered whole for it. Setting ``loss_type = "ForCausalLM"``, the loss
    Hugging Face falls back to, changes no result and keeps the cross-entropy
    next to the LM head, where the ``tensor_parallel`` pass makes it
    vocab-parallel."""
    if getattr(model, "loss_type", "") is not None or not hasattr(type(model), "loss_function"):
        return
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # pragma: no cover - a transformers without loss mapping
        return
    if "ForCausalLM" in LOSS_MAPPING:
        model.loss_type = "ForCausalLM"
        log.info("tensor parallelism: %s has no loss_type; set to ForCausalLM (Hugging Face's default) so its loss "
                 "is traced with its logits and computed vocab-parallel", type(model).__name__)


def _embeddings(model: nn.Module) -> tuple[str, str | None]:
    """(input embedding module path, LM head module path or None)."""
    names = {id(m): n for n, m in model.named_modules()}
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if emb is None:
        found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        emb = found[0] if found else None
    if emb is None or id(emb) not in names:
        raise ConfigError(f"zerograph.tp_vocab_parallel: {type(model).__name__} has no nn.Embedding to split "
                          "over the vocabulary; set zerograph.tp_vocab_parallel to false")
    if head is None:  # the Linear whose output features are the vocabulary (last one: the head)
        vocab = emb.weight.shape[0]
        found = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
        head = found[-1] if found else None
    return names[id(emb)], names.get(id(head)) if head is not None else None


def vocab_splits(model: nn.Module, decided: dict[str, LayerSplit]) -> dict[str, LayerSplit]:
    """The input embedding (rows: the vocabulary) and the LM head (a column
    split: its output features are the vocabulary) as ``"vocab"`` splits. A
    head tied to the embedding is one parameter split once; a head without
    bias is required (a vocab-split bias is not done)."""
    emb, head = _embeddings(model)
    out = {emb: LayerSplit(emb, "vocab", None, "zerograph.tp_vocab_parallel")}
    if head is not None:
        layer = model.get_submodule(head)
        if head in decided:
            raise ConfigError(f"zerograph.tp_vocab_parallel: the LM head {head} is already {decided[head].kind}-"
                              f"split by {decided[head].source}; remove that layer spec")
        if getattr(layer, "bias", None) is not None:
            raise ConfigError(f"zerograph.tp_vocab_parallel: the LM head {head} has a bias, which zerograph does not "
                              "split over the vocabulary yet; set zerograph.tp_vocab_parallel to false")
        if not isinstance(layer, nn.Linear):
            raise ConfigError(f"zerograph.tp_vocab_parallel: the LM head {head} is a {type(layer).__name__}, not "
                              "an nn.Linear; set zerograph.tp_vocab_parallel to false")
        out[head] = LayerSplit(head, "vocab", None, "zerograph.tp_vocab_parallel")
    return out


def _decide_layer_splits(model: nn.Module, partition_config: dict | None,
                         capture: Callable[[], list] | None, allow_none: bool = False) -> dict[str, LayerSplit]:
    modules = splittable_modules(model)
    specs, use_default = parse_partition_config(partition_config)
    out: dict[str, LayerSplit] = {}
    decided: set[str] = set()
    for spec in specs:
        hits = [m for m in modules if spec.matches(m)]
        if not hits:
            examples = ", ".join(f"{m}.weight" for m in list(modules)[:4]) or "none"
            raise ConfigError(
                f"{_SECTION}.layer_specs[{spec.index}]: patterns {[p.pattern for p in spec.patterns]} match no "
                f"Linear or Conv1D layer of {type(model).__name__} (weights are named like {examples}); fix the "
                "patterns or remove the spec")
        for m in hits:
            if m in decided:
                continue
            decided.add(m)
            if spec.kind != "skip":
                parts = _spec_parts(spec, _out_features(model, m, modules[m]), m)
                out[m] = LayerSplit(m, spec.kind, parts, f"layer_specs[{spec.index}]")
    rest = {m: form for m, form in modules.items() if m not in decided}
    if use_default and rest:
        plan = hf_tp_plan(model)
        unknown = _unknown_hf_styles(plan, rest) if plan is not None else {}
        if unknown and capture is not None:  # e.g. Phi-3's colwise_rep / rowwise_split_input around fused weights
            log.info("tensor parallelism: %s's Hugging Face tp plan uses styles zerograph does not do (%s); the graph "
                     "rule decides its splits instead", type(model).__name__,
                     ", ".join(f"{k!r}: {v!r}" for k, v in sorted(unknown.items())))
            plan = None
        if plan is not None:
            for m in rest:
                found = _hf_kind(plan, m)
                if found is not None:
                    kind, key = found
                    parts = (_out_features(model, m, rest[m]) // 2,) * 2 if plan[key] == "packed_colwise" else None
                    out[m] = LayerSplit(m, kind, parts, f"base_model_tp_plan[{key!r}]")
        elif capture is not None:
            try:
                rule = graph_rule(capture(), rest)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            for m, split in rule.items():
                out[m] = LayerSplit(m, split.kind, split.parts, "graph rule")
        elif not specs:
            raise ConfigError(
                f"tensor parallelism must know which layers of {type(model).__name__} to split, and it has no "
                "Hugging Face tp plan: pass zerograph.compile(model, config, example_batch=batch) so the graph rule "
                f"can trace it, or list the layers in {_SECTION}.layer_specs")
        else:
            log.info("tensor parallelism: no example batch to trace, so only layer_specs split layers of %s",
                     type(model).__name__)
    if not out and not allow_none:  # (with vocab_parallel the embedding and head are split anyway)
        raise ConfigError(
            f"tensor parallelism finds no layer of {type(model).__name__} to split (no column/row linear pair); "
            f"list the layers in {_SECTION}.layer_specs")
    return out


def _out_features(model: nn.Module, module: str, form: str) -> int:
    weight = model.get_submodule(module).weight
    return weight.shape[0 if form == "linear" else 1]


def tp_layouts(model: nn.Module, splits: dict[str, LayerSplit], size: int, index: int) -> dict[str, TpLayout]:
    """Parameter FQN (as ``named_parameters`` names it) -> its :class:`TpLayout`."""
    forms = splittable_modules(model)
    canonical = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for m, split in splits.items():
        layer = model.get_submodule(m)
        shape = tuple(layer.weight.shape)
        if split.kind == "vocab":  # embedding [V, C] / head Linear [V, C]: rows are the vocabulary
            try:
                out[canonical[id(layer.weight)]] = TpLayout("vocab", m, 0, (shape[0],), shape, size, index)
            except ValueError as exc:
                raise ConfigError(f"{exc} (zerograph.tp_vocab_parallel splits the vocabulary)") from None
            continue
        out_dim = 0 if forms[m] == "linear" else 1
        try:
            if split.kind == "column":
                parts = split.parts or (shape[out_dim],)
                reps = kv_replicas(model, m, parts, size)
                out[canonical[id(layer.weight)]] = TpLayout("column", m, out_dim, parts, shape, size, index, reps)
                if getattr(layer, "bias", None) is not None:
                    out[canonical[id(layer.bias)]] = TpLayout("column", m, 0, parts, tuple(layer.bias.shape),
                                                              size, index, reps)
            else:
                in_dim = 1 - out_dim
                out[canonical[id(layer.weight)]] = TpLayout("row", m, in_dim, (shape[in_dim],), shape, size, index)
        except ValueError as exc:
            raise ConfigError(f"{exc} (the {split.kind} split comes from {split.source})") from None
    return out


def kv_replicas(model: nn.Module, module: str, parts: tuple[int, ...], size: int) -> int:
    """How many tp ranks hold each key/value head of a column-split key or
    value projection: ``size / num_key_value_heads`` when the model's Hugging
    Face config has fewer key/value heads than ``size`` (grouped-query
    attention; each tp rank holds the key/value head its query heads read),
    else 1. The projection is recognised by its output features
    (``num_key_value_heads * head_dim``, one part) under an attention module."""
    cfg = getattr(model, "config", None)
    nkv, nq = getattr(cfg, "num_key_value_heads", None), getattr(cfg, "num_attention_heads", None)
    if not isinstance(nkv, int) or not isinstance(nq, int) or not 0 < nkv < min(size, nq) or len(parts) != 1:
        return 1
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // nq
    if parts[0] != nkv * head_dim or not re.search(r"attn|attention", module):
        return 1
    if size % nkv or nq % size:
        valid = [t for t in range(1, nq + 1) if nq % t == 0 and (t % nkv == 0 or nkv % t == 0)]
        raise ConfigError(
            f"{module}: {nkv} key/value heads (and {nq} query heads) cannot be split over "
            f"tensor_parallel.autotp_size={size}: with fewer key/value heads than tp ranks each key/value head is "
            f"replicated on autotp_size / {nkv} ranks, so autotp_size must be a multiple of {nkv} that divides {nq}; "
            f"valid autotp_size values: {', '.join(map(str, valid))}")
    return size // nkv


def describe(splits: dict[str, LayerSplit]) -> str:
    lines = []
    for m, s in splits.items():
        fused = f" in {len(s.parts)} parts {list(s.parts)}" if s.parts else ""
        lines.append(f"  {m}: {s.kind}{fused} ({s.source})")
    return "\n".join(lines)
