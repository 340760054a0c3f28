"""Measured training FLOPs: torch's ``FlopCounterMode``, corrected for attention and extended to our kernels.

Torch (2.13) ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions by dispatching every
aten op through a formula table. Where it is wrong and what we do:

- CPU ``scaled_dot_product_attention`` counts 0: the CPU flash op ``aten._scaled_dot_product_flash_attention_for_cpu``
  and its backward have no formula. We add one for both.
- Causal attention is never halved. Our formulas read ``is_causal`` from the op's arguments and apply the
  library's causal-attention convention (``lightning_scaling.flops``: "half" by default, or "full").
- The SDPA backward is counted as 2.5 × forward (it includes recomputing the scores: hardware FLOPs). We count
  2 × forward, the model FLOPs of the analytic formulas (Chinchilla App. F: backward = 2 × forward).

- The low-level ``_flash_attention_*``/``_efficient_attention_*`` ops take [B, S, H, D] tensors, which torch's
  formulas read as [B, H, S, D]: a wrong count when they are called directly on dense tensors. We count them
  from the right layout (variable-length batches: torch's own per-sequence count, rescaled as above).

This covers the SDPA ops forward and backward (CPU flash, CUDA flash, memory-efficient, cuDNN, the
"overrideable" fused op, the low-level ops). Ops registered with ``register_flop_formula`` (our Triton kernels)
are counted under the same convention. Everything else (matmuls, convolutions) is torch's own table, which
counts no elementwise op (softmax, norms, activations) and no embedding lookup.

Units: FLOPs (a multiply-add is 2) for everything ``fn`` runs, i.e. the whole batch.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.flop_counter as _torch_flop_counter
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling._validation import one_of
from lightning_scaling.flops import (
    CAUSAL_ATTENTION_CONVENTIONS,
    DEFAULT_CAUSAL_ATTENTION,
    causal_attention_factor,
)

__all__ = [
    "MeasuredFlops",
    "TrainingFlopCounter",
    "count_parameters",
    "measure_training_flops",
    "register_flop_formula",
    "registered_flop_formulas",
    "training_flop_counter",
]

_aten = torch.ops.aten
_OURS = "_lightning_scaling_formula"  # marks entries we put in torch's global flop registry

# Formulas registered with ``register_flop_formula``: op packet -> formula(*shapes, out_shape, causal_attention)
_REGISTERED: dict[Any, Callable[..., int]] = {}


# --------------------------------------------------------------------------------------------------- helpers
def _shape_of(x: Any) -> Any:
    return x.shape if isinstance(x, torch.Tensor) else x


def _packet(op: Any) -> Any:
    """The ``OpOverloadPacket`` behind ``op`` (a packet, an overload, a ``torch.library.custom_op`` object or a
    "namespace::name" string): FlopCounterMode keys its table by packet."""
    if isinstance(op, str):
        if "::" not in op:
            raise ValueError(f"op must be 'namespace::name', an op or a custom_op, got {op!r}")
        namespace, name = op.split("::", 1)
        try:
            return getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            raise ValueError(f"op {op!r} is not a registered torch op") from None
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op
    if isinstance(op, torch._ops.OpOverload):
        return op._overloadpacket
    overload = getattr(op, "_opoverload", None)  # torch.library.custom_op returns a CustomOpDef
    if isinstance(overload, torch._ops.OpOverload):
        return overload._overloadpacket
    raise ValueError(f"op must be a torch op (torch.ops.ns.name), an overload, a torch.library.custom_op or "
                     f"a 'ns::name' string, got {op!r} of type {type(op).__name__}")


def _compatible(type_name: str, value: Any) -> bool:
    if type_name in ("Tensor", "Optional[Tensor]"):
        return value is None or isinstance(value, torch.Tensor)
    if type_name == "bool":
        return isinstance(value, bool)
    return not isinstance(value, torch.Tensor)


def _matching_schema(packet: Any, args: tuple) -> Any:
    """The schema of the overload of ``packet`` whose positional argument types fit ``args`` (None if none)."""
    for overload in packet.overloads():
        schema = getattr(packet, overload)._schema
        positional = [a for a in schema.arguments if not a.kwarg_only]
        if len(args) <= len(positional) and all(_compatible(str(a.type), v) for a, v in zip(positional, args)):
            return schema
    return None


def _bind(packet: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Arguments by schema name, defaults filled in (None if no overload of ``packet`` fits ``args``)."""
    schema = _matching_schema(packet, args)
    if schema is None:
        return None
    bound = {a.name: (a.default_value if a.has_default_value() else None) for a in schema.arguments}
    bound.update(zip((a.name for a in schema.arguments if not a.kwarg_only), args))
    bound.update(kwargs)
    return bound


def _with_defaults(packet: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with every omitted defaulted argument filled in. The dispatcher drops trailing
    arguments equal to their defaults and passes every non-keyword-only argument positionally."""
    schema = _matching_schema(packet, args)
    if schema is None:
        return args, kwargs
    full_args = list(args)
    for a in [a for a in schema.arguments if not a.kwarg_only][len(args):]:
        if not a.has_default_value():
            break
        full_args.append(a.default_value)
    full_kwargs = {a.name: a.default_value for a in schema.arguments if a.kwarg_only and a.has_default_value()}
    full_kwargs.update(kwargs)
    return tuple(full_args), full_kwargs


def _raw(fn: Callable[..., int]) -> Callable[..., int]:
    """Mark a formula as taking raw tensors (FlopCounterMode then does not replace them by shapes)."""
    fn._get_raw = True  # type: ignore[attr-defined]
    return fn


# ------------------------------------------------------------------------------------ attention formulas
def _dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                     causal_attention: str) -> int:
    """Forward FLOPs of Q·Kᵀ and P·V for [B, H, S, D] tensors (GQA: key/value heads broadcast to H)."""
    b, h, s_q, d_q = query.shape
    s_k, d_v = key.shape[-2], value.shape[-1]
    # FlashAttention count 2·B·H·Sq·Sk·(Dq + Dv) (= lightning_scaling.flops.attention_flops), halved if causal
    return int(2 * b * h * s_q * s_k * (d_q + d_v) * causal_attention_factor(bool(causal), causal_attention))


_SDPA_FORWARD = {  # aten op -> name of its "causal" argument
    _aten._scaled_dot_product_flash_attention_for_cpu: "is_causal",
    _aten._scaled_dot_product_flash_attention: "is_causal",
    _aten._scaled_dot_product_efficient_attention: "is_causal",
    _aten._scaled_dot_product_cudnn_attention: "is_causal",
    _aten._scaled_dot_product_fused_attention_overrideable: "is_causal",
}
_SDPA_BACKWARD = {
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: "is_causal",
    _aten._scaled_dot_product_flash_attention_backward: "is_causal",
    _aten._scaled_dot_product_efficient_attention_backward: "is_causal",
    _aten._scaled_dot_product_cudnn_attention_backward: "is_causal",
    _aten._scaled_dot_product_fused_attention_overrideable_backward: "is_causal",
}
# Low-level ops ([B, S, H, D], or variable-length): op -> (its causal argument, is it a backward op).
# Causal: is_causal, or custom_mask_type != 0.
_LOW_LEVEL = {
    _aten._flash_attention_forward: ("is_causal", False),
    _aten._efficient_attention_forward: ("custom_mask_type", False),
    _aten._flash_attention_backward: ("is_causal", True),
    _aten._efficient_attention_backward: ("custom_mask_type", True),
}


def _sdpa_formula(packet: Any, causal_arg: str, backward: bool, causal_attention: str) -> Callable[..., int]:
    torch_formula = _torch_flop_counter.flop_registry.get(packet)

    @_raw
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        bound = _bind(packet, args, kwargs)
        q, k, v = (None, None, None) if bound is None else (bound["query"], bound["key"], bound["value"])
        if not all(isinstance(t, torch.Tensor) and not t.is_nested and t.dim() == 4 for t in (q, k, v)):
            # Nested or unusual layouts: torch's own count (full attention, 2.5x backward)
            return torch_formula(*args, out_val=out_val, **kwargs) if torch_formula else 0
        forward = _dense_attention(q, k, v, bool(bound[causal_arg]), causal_attention)
        return 2 * forward if backward else forward  # model FLOPs: backward = 2 x forward (Chinchilla App. F)

    return formula


def _low_level_formula(packet: Any, causal_arg: str, backward: bool, causal_attention: str) -> Callable[..., int]:
    torch_formula = _torch_flop_counter.flop_registry[packet]
    varlen_arg = "cum_seq_q" if "flash" in str(packet) else "cu_seqlens_q"

    @_raw
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        bound = _bind(packet, args, kwargs)
        if bound is None:
            return torch_formula(*args, out_val=out_val, **kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        causal = bool(bound[causal_arg])  # efficient: custom_mask_type 0 = none, 1/2 = causal (top/bottom-right)
        if bound[varlen_arg] is None and q.dim() == 4:
            # Dense: these ops take [B, S, H, D]; torch reads [B, H, S, D] and so miscounts them (torch 2.13)
            b, s_q, h, d_q = q.shape
            s_k, d_v = k.shape[1], v.shape[-1]
            forward = int(2 * b * h * s_q * s_k * (d_q + d_v) * causal_attention_factor(causal, causal_attention))
            return 2 * forward if backward else forward
        # Variable length: torch's per-sequence count (full attention), rescaled to our convention
        counted = torch_formula(*args, out_val=out_val, **kwargs)
        factor = causal_attention_factor(causal, causal_attention)
        if backward:
            # torch counts 2·BHSqSk·(3Dq + 2Dv) (recomputed scores included); model FLOPs are 2·BHSqSk·(2Dq + 2Dv)
            d_q, d_v = q.shape[-1], v.shape[-1]
            return int(counted * factor * (2 * d_q + 2 * d_v) / (3 * d_q + 2 * d_v))
        return int(counted * factor)

    return formula


# ---------------------------------------------------------------------------------- registered formulas
def _bind_convention(packet: Any, formula: Callable[..., int], causal_attention: str) -> Callable[..., int]:
    """FlopCounterMode calls ``f(*args, **kwargs, out_val=out)`` with raw tensors; call ``formula`` with shapes,
    defaults filled in, and the convention."""

    @_raw
    @functools.wraps(formula)
    def counted(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        args, kwargs = _with_defaults(packet, args, kwargs)
        args, kwargs, out_shape = tree_map(_shape_of, (args, kwargs, out_val))
        return int(formula(*args, out_shape=out_shape, causal_attention=causal_attention, **kwargs))

    return counted


def register_flop_formula(op: Any, formula: Callable[..., int]) -> None:
    """Count ``op`` with ``formula`` in ``training_flop_counter`` and in every plain ``FlopCounterMode``.

    ``op``: ``torch.ops.ns.name`` (or one overload of it), the object ``torch.library.custom_op`` returns, or
    the string "ns::name". Calling convention: for each call of the op, ``formula`` receives

        formula(*args, out_shape=..., causal_attention="half" | "full", **kwargs) -> int

    where ``args`` are ALL the op schema's positional (not keyword-only) arguments in schema order, however the
    caller passed them (by keyword too), with defaults filled in, and ``kwargs`` all its keyword-only arguments
    (defaults filled in); every tensor is replaced by its ``torch.Size`` (inside lists and tuples too), other
    values (None, numbers, bools) are unchanged; ``out_shape`` is the op's output with tensors likewise replaced
    by shapes (a tuple for several outputs); ``causal_attention`` is the convention of the counter ("half"
    under a plain ``FlopCounterMode``: ``DEFAULT_CAUSAL_ATTENTION``). It returns the FLOPs of that call (a
    multiply-add is 2), for the whole batch. A backward op is a separate op with its own formula (model FLOPs:
    2 × forward). Ops the custom op runs inside itself are not seen by the counter (no double count).

    Register at import time of the module that defines the op: ``training_flop_counter`` takes the formulas
    registered when it is created. Registering the same op again replaces our earlier formula. An op that
    torch itself already counts is refused with ``ValueError``.
    """
    packet = _packet(op)
    if not callable(formula):
        raise ValueError(f"formula must be callable, got {formula!r}")
    registry = _torch_flop_counter.flop_registry
    previous = registry.get(packet)
    if previous is not None and not getattr(previous, _OURS, False):
        raise ValueError(f"op {packet} already has a FLOP formula in torch.utils.flop_counter; not replacing it")
    default = _bind_convention(packet, formula, DEFAULT_CAUSAL_ATTENTION)
    setattr(default, _OURS, True)
    if previous is None:
        _torch_flop_counter.register_flop_formula(packet, get_raw=True)(default)
    else:
        registry[packet] = default  # torch's registration refuses duplicates; replace our own entry
    _REGISTERED[packet] = formula


def registered_flop_formulas() -> dict[Any, Callable[..., int]]:
    """The formulas registered with ``register_flop_formula``, by op packet (a copy)."""
    return dict(_REGISTERED)


# ------------------------------------------------------------------------------------------------ counter
def _corrected_mapping(causal_attention: str) -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    for packet, arg in _SDPA_FORWARD.items():
        mapping[packet] = _sdpa_formula(packet, arg, False, causal_attention)
    for packet, arg in _SDPA_BACKWARD.items():
        mapping[packet] = _sdpa_formula(packet, arg, True, causal_attention)
    for packet, (arg, backward) in _LOW_LEVEL.items():
        if packet in _torch_flop_counter.flop_registry:
            mapping[packet] = _low_level_formula(packet, arg, backward, causal_attention)
    for packet, formula in _REGISTERED.items():
        mapping[packet] = _bind_convention(packet, formula, causal_attention)
    return mapping


class TrainingFlopCounter(FlopCounterMode):
    """A ``FlopCounterMode`` with the corrected attention formulas and our registered ops, bound to one
    causal-attention convention, that also splits the count into forward and backward.

    An op counts as backward when it runs inside the autograd engine (``loss.backward()``,
    ``torch.autograd.grad``): with activation checkpointing the recomputed forward lands in ``backward``.
    """

    def __init__(self, causal_attention: str = DEFAULT_CAUSAL_ATTENTION, display: bool = False,
                 depth: int = 2) -> None:
        one_of("causal_attention", causal_attention, CAUSAL_ATTENTION_CONVENTIONS)
        super().__init__(display=display, depth=depth, custom_mapping=_corrected_mapping(causal_attention))
        self.causal_attention = causal_attention
        self.phase_counts: dict[str, dict[Any, int]] = {"forward": defaultdict(int), "backward": defaultdict(int)}

    def __enter__(self) -> TrainingFlopCounter:
        for counts in self.phase_counts.values():
            counts.clear()
        super().__enter__()
        return self

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        before = self.flop_counts["Global"].get(func_packet, 0)
        result = super()._count_flops(func_packet, out, args, kwargs)
        added = self.flop_counts["Global"].get(func_packet, 0) - before
        if added:
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            self.phase_counts[phase][func_packet] += added
        return result

    @property
    def forward_flops(self) -> int:
        return sum(self.phase_counts["forward"].values())

    @property
    def backward_flops(self) -> int:
        return sum(self.phase_counts["backward"].values())


def training_flop_counter(causal_attention: str = DEFAULT_CAUSAL_ATTENTION,
                          display: bool = False) -> TrainingFlopCounter:
    """A ``FlopCounterMode`` (context manager) with corrected SDPA formulas (forward and backward, every backend,
    ``is_causal`` honoured under ``causal_attention`` "half" or "full") and every ``register_flop_formula`` op.
    ``display=True`` prints torch's per-module table on exit (needs ``tabulate``)."""
    return TrainingFlopCounter(causal_attention=causal_attention, display=display)


@dataclass(frozen=True)
class MeasuredFlops:
    """FLOPs counted while running one training step (whatever ``fn`` ran: usually the whole batch).

    ``by_op`` maps op name ("aten.mm") to FLOPs; ``forward``/``backward`` split by whether the op ran inside the
    autograd engine."""

    total: int
    forward: int
    backward: int
    causal_attention: str
    by_op: dict[str, int] = field(default_factory=dict)


def measure_training_flops(fn: Callable[[], Any], causal_attention: str = DEFAULT_CAUSAL_ATTENTION) -> MeasuredFlops:
    """Run ``fn()`` (forward, loss and backward of one batch) under ``training_flop_counter`` and return its FLOPs."""
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no arguments, got {fn!r}")
    counter = training_flop_counter(causal_attention)
    with counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items() if n}
    return MeasuredFlops(total=int(counter.get_total_flops()), forward=counter.forward_flops,
                         backward=counter.backward_flops, causal_attention=causal_attention, by_op=by_op)


def count_parameters(module: nn.Module, non_embedding: bool = False) -> int:
    """Number of unique parameters of ``module`` (a tensor shared by several modules, e.g. a tied head, once).

    ``non_embedding=True`` leaves out the weights of every ``nn.Embedding`` (token and learned position
    embeddings), and with them an output head tied to one (it is the same tensor); an untied head counts.
    Counts the local tensors: under FSDP/sharding pass the full module or use full shapes.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    excluded: set[int] = set()
    if non_embedding:
        excluded = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if id(p) not in excluded)
