"""Measured training FLOPs: torch's ``FlopCounterMode``, with one attention convention on every code path.

Torch (2.13) ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions by dispatching every
aten op through a formula table. It counts CPU ``scaled_dot_product_attention`` as 0 (no formula for the CPU
flash op), never halves causal attention, counts the fused attention backward as 2.5 × forward (recomputed
scores included), misreads the [B, S, H, D] layout of the low-level flash/efficient ops, and refuses the
``flex_attention`` operator. ``TrainingFlopCounter`` fixes these and keeps two counts of every op:

Model FLOPs (``get_total_flops()``, ``forward_flops``, ``backward_flops``)
    What the model needs, whatever kernel runs it, under one causal-attention convention
    (``lightning_scaling.flops``: ``"half"`` by default, or ``"full"``). The attention matmuls of a causal layer
    (Q·Kᵀ and P·V, and the four matmuls of their backward) count half under ``"half"``; the attention backward
    counts 2 × its forward (Chinchilla App. F). A causal layer is recognised on each path:

    - fused kernels (every SDPA backend forward and backward, the low-level flash/efficient ops): ``is_causal``
      (or ``custom_mask_type`` != 0), or an explicit mask (boolean, or additive float where a value at or below
      half the dtype's lowest number masks) that lets no query see a later key, padding folded in or not (rows
      with every key allowed, as some libraries write for padded queries, are ignored);
    - eager attention (batched matmul, scale/mask/bias, softmax, dropout, batched matmul), as Hugging Face's
      eager path, GPT-2 with attention dropout and SDPA's own math fallback run it: followed from the score
      matmul through elementwise ops to the softmax and on to the P·V matmul, whose probabilities are read:
      causal when every probability above the diagonal is exactly 0 (padded queries aside: rows that allow
      every key, or whose probabilities are all equal because every logit was the mask value);
    - ``flex_attention``: its ``mask_mod`` evaluated on batch 0, head 0, and read like a mask. (torch 2.13 runs
      eager ``flex_attention`` through ``torch.compile(fullgraph=True)``, which refuses to run under any
      dispatch mode, this counter included: the operator reaches the counter only with
      ``torch.nn.attention.flex_attention._FLEX_ATTENTION_DISABLE_COMPILE_DEBUG = True``.)

    Masks and probabilities are read with one host sync per check, at most ``MASK_CHECK_ELEMENTS`` values (whole
    rows, a strided sample beyond that). Not recognised, so counted in full: a mask on the meta device or inside
    a tensor subclass (values unreadable), a mask whose query length differs from its key length (a KV cache,
    cross-attention), attention written without a softmax op or with unbatched 2-D matmuls. Sliding-window and
    block-diagonal (packed documents) causal masks are counted as causal, like the analytic formulas.

Hardware FLOPs (``hardware_flops``, ``hardware_forward_flops``, ``hardware_backward_flops``)
    What the kernels execute, independent of the convention: a masked fused kernel and eager attention compute
    the full S×S square; a fused kernel told ``is_causal`` skips the upper triangle (counted as half); the fused
    backward recomputes the scores (2·B·H·Sq·Sk·(3·Dq + 2·Dv), 2.5 × forward); flex attention computes the
    blocks of its block mask. Recomputation under activation checkpointing lands in the backward counts of both.

Ops registered with ``register_flop_formula`` (our Triton kernels) are counted with their formulas. Everything
else (matmuls, convolutions) is torch's own table, which counts no elementwise op (softmax, norms,
activations), no bias addition and no embedding lookup.

Units: FLOPs (a multiply-add is 2) for everything ``fn`` runs, i.e. the whole batch.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.flop_counter as _torch_flop_counter
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from lightning_scaling.argument_checks import one_of
from lightning_scaling.flops.formulas import (
    CAUSAL_ATTENTION_CONVENTIONS,
    DEFAULT_CAUSAL_ATTENTION,
    causal_attention_factor,
)

__all__ = [
    "ATTENTION_PATHS",
    "MASK_CHECK_ELEMENTS",
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
_REGISTERED_ATTENTION: set[Any] = set()  # registered ops whose FLOPs are attention's (quadratic in S)
_REGISTERED_HARDWARE: dict[Any, Callable[..., int]] = {}

#: How each attention call was recognised (keys of ``TrainingFlopCounter.attention_calls``): the code path
#: ("fused": an SDPA backend or low-level flash/efficient op; "eager": matmul, softmax, matmul; "flex":
#: flex_attention) and what made it causal ("causal": the kernel's ``is_causal`` flag; "causal_mask": a mask or
#: probabilities with nothing above the diagonal), or "full": not causal, or not recognised as such.
ATTENTION_PATHS: tuple[str, ...] = (
    "fused:causal",
    "fused:causal_mask",
    "fused:full",
    "eager:causal_mask",
    "eager:full",
    "flex:causal_mask",
    "flex:full",
)

#: At most this many mask or probability values are read per causality check (whole rows; beyond it an evenly
#: strided sample of rows over batch, heads and queries).
MASK_CHECK_ELEMENTS: int = 1 << 22


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
    raise ValueError(
        f"op must be a torch op (torch.ops.ns.name), an overload, a torch.library.custom_op or "
        f"a 'ns::name' string, got {op!r} of type {type(op).__name__}"
    )


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
        # args may stop early (the dispatcher drops trailing arguments equal to their defaults), never run over
        if len(args) <= len(positional) and all(
            _compatible(str(a.type), v) for a, v in zip(positional[: len(args)], args, strict=True)
        ):
            return schema
    return None


def _bind(packet: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Arguments by schema name, defaults filled in (None if no overload of ``packet`` fits ``args``)."""
    schema = _matching_schema(packet, args)
    if schema is None:
        return None
    bound = {a.name: (a.default_value if a.has_default_value() else None) for a in schema.arguments}
    positional = [a.name for a in schema.arguments if not a.kwarg_only]
    bound.update(zip(positional[: len(args)], args, strict=True))  # _matching_schema: len(args) <= len(positional)
    bound.update(kwargs)
    return bound


def _with_defaults(packet: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with every omitted defaulted argument filled in. The dispatcher drops trailing
    arguments equal to their defaults and passes every non-keyword-only argument positionally."""
    schema = _matching_schema(packet, args)
    if schema is None:
        return args, kwargs
    full_args = list(args)
    for a in [a for a in schema.arguments if not a.kwarg_only][len(args) :]:
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


# ------------------------------------------------------------------------------- reading masks for causality
def _readable(t: Any) -> bool:
    """Whether the values of ``t`` can be read (a plain tensor with real storage: not meta, fake or a subclass)."""
    return type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" and t.layout == torch.strided


def _sample_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [..., Sq, Sk] as [R, Sk], with each row's query index [R]: every row when they hold at most
    ``MASK_CHECK_ELEMENTS`` values, else an evenly strided sample over the leading dimensions and the queries.
    Broadcast (stride-0) leading dimensions are read once."""
    for dim in range(x.dim() - 2):
        if x.stride(dim) == 0 and x.size(dim) > 1:
            x = x.narrow(dim, 0, 1)
    lead, s_q, s_k = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    n_rows = math.prod(lead) * s_q
    n_sample = min(n_rows, max(1, MASK_CHECK_ELEMENTS // max(s_k, 1)))
    flat = torch.arange(n_sample, device=x.device, dtype=torch.long)
    if n_sample < n_rows:  # first and last rows included, evenly strided in between
        flat = flat * (n_rows - 1) // max(n_sample - 1, 1)
    query = flat % s_q
    rest, index = flat // s_q, []
    for size in reversed(lead):
        index.append(rest % size)
        rest = rest // size
    index.reverse()  # outermost dimension first, then the query
    index.append(query)
    return x[tuple(index)], query


def _causal_pattern(allowed: torch.Tensor, query: torch.Tensor, informative: torch.Tensor | None = None) -> bool:
    """Whether rows ``allowed`` [R, Sk] (True: the query at ``query`` [R] may see that key) are causal: some key
    after a query is masked, and none is allowed except in rows that allow every key (padding rows).

    ``informative`` [R] (probabilities only): rows whose probabilities are not all equal. When there are any,
    only they are judged: a padded query whose every logit is the mask value gets equal probabilities over keys
    that no causal rule chose (Hugging Face 4.x eager GPT-2 with left padding)."""
    above = torch.arange(allowed.shape[-1], device=allowed.device)[None, :] > query[:, None]
    leaks = (allowed & above).any(-1) & ~allowed.all(-1)
    masked = (~allowed & above).any(-1)
    if informative is not None:
        judged = informative | ~informative.any()  # every row when none is informative (e.g. zero queries)
        leaks, masked = leaks & judged, masked & judged
    return bool(masked.any() & ~leaks.any())  # one host sync


def _mask_is_causal(mask: Any, s_q: int, s_k: int) -> bool:
    """Whether an attention mask (boolean: True = attend; or additive float) lets no query see a later key."""
    if not isinstance(mask, torch.Tensor) or s_q != s_k or s_q < 2 or mask.dim() < 2:
        return False
    if tuple(mask.shape[-2:]) != (s_q, s_k) or not _readable(mask):
        return False
    try:
        with torch.no_grad():
            rows, query = _sample_rows(mask.detach())
            if rows.dtype == torch.bool:
                allowed = rows
            elif rows.is_floating_point():
                allowed = rows > torch.finfo(rows.dtype).min / 2  # -inf and dtype-min both mask
            else:
                return False
            return _causal_pattern(allowed, query)
    except (RuntimeError, TypeError, ValueError):
        return False


def _distinct_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its broadcast (stride-0) dimensions narrowed to one: the values it really holds."""
    for dim in range(x.dim()):
        if x.stride(dim) == 0 and x.size(dim) > 1:
            x = x.narrow(dim, 0, 1)
    return x


def _comparable(mask: torch.Tensor) -> bool:
    """Whether comparing ``mask`` with another costs less than checking it: at most ``MASK_CHECK_ELEMENTS``
    values once broadcast dimensions are read once (the check reads that many at most, sampled)."""
    return _readable(mask) and _distinct_values(mask).numel() <= MASK_CHECK_ELEMENTS


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two masks of one layout hold the same values (one host read)."""
    try:
        with torch.no_grad():
            return a.device == b.device and bool(torch.equal(_distinct_values(a), _distinct_values(b)))
    except (RuntimeError, TypeError):
        return False


def _probabilities_are_causal(probs: torch.Tensor) -> bool:
    """Whether attention probabilities [..., Sq, Sk] are exactly 0 above the diagonal (padding rows aside: rows
    with every key, or with all-equal probabilities when other rows are not)."""
    if probs.dim() < 2 or probs.shape[-1] != probs.shape[-2] or probs.shape[-1] < 2 or not _readable(probs):
        return False
    try:
        with torch.no_grad():
            rows, query = _sample_rows(probs.detach())
            nonzero = rows != 0
            largest = rows.masked_fill(~nonzero, float("-inf")).amax(-1)
            smallest = rows.masked_fill(~nonzero, float("inf")).amin(-1)
            return _causal_pattern(nonzero, query, informative=largest > smallest)
    except (RuntimeError, TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------ attention formulas
def _square(b: int, h: int, s_q: int, s_k: int, d_q: int, d_v: int) -> int:
    """Forward FLOPs of Q·Kᵀ and P·V over the full square: 2·B·H·Sq·Sk·(Dq + Dv) (FlashAttention's count;
    ``lightning_scaling.flops.attention_flops`` for Dq = Dv)."""
    return 2 * b * h * s_q * s_k * (d_q + d_v)


def _recomputing_backward(b: int, h: int, s_q: int, s_k: int, d_q: int, d_v: int) -> int:
    """Hardware FLOPs of a fused attention backward: Q·Kᵀ recomputed, dV, dP, dQ, dK: 2·B·H·Sq·Sk·(3·Dq + 2·Dv)."""
    return 2 * b * h * s_q * s_k * (3 * d_q + 2 * d_v)


def _scaled(flops: int, factor: float) -> int:
    return flops // 2 if factor == 0.5 else flops


_SDPA_FORWARD = (
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._scaled_dot_product_fused_attention_overrideable,
)
_SDPA_BACKWARD = (
    _aten._scaled_dot_product_flash_attention_for_cpu_backward,
    _aten._scaled_dot_product_flash_attention_backward,
    _aten._scaled_dot_product_efficient_attention_backward,
    _aten._scaled_dot_product_cudnn_attention_backward,
    _aten._scaled_dot_product_fused_attention_overrideable_backward,
)
# Low-level ops ([B, S, H, D], or variable-length): op -> (its causal argument, is it a backward op).
# Causal: is_causal, or custom_mask_type != 0 (1/2: causal from the top-left/bottom-right).
_LOW_LEVEL = {
    _aten._flash_attention_forward: ("is_causal", False),
    _aten._efficient_attention_forward: ("custom_mask_type", False),
    _aten._flash_attention_backward: ("is_causal", True),
    _aten._efficient_attention_backward: ("custom_mask_type", True),
}
_MASK_ARGUMENTS = ("attn_mask", "attn_bias", "bias")


def _mask_argument(bound: dict[str, Any]) -> Any:
    for name in _MASK_ARGUMENTS:
        if bound.get(name) is not None:
            return bound[name]
    return None


# Eager attention is followed through these ops (the probabilities or score gradients they carry stay what they
# were: a view, a cast, a scale, a mask, a bias, a softcap, dropout).
_MATMULS = frozenset({_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm})
_SCORE_MATMULS = frozenset({_aten.bmm, _aten.baddbmm})
_SOFTMAX = frozenset({_aten._softmax, _aten._safe_softmax})
_PASS_THROUGH = frozenset(
    getattr(_aten, name)
    for name in (
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "reshape",
        "expand",
        "clone",
        "contiguous",
        "transpose",
        "t",
        "permute",
        "unsqueeze",
        "squeeze",
        "alias",
        "detach",
        "as_strided",
        "slice",
        "select",
        "_conj",
        "conj",
        "_to_copy",
        "to",
        "lift_fresh",
        "mul",
        "mul_",
        "div",
        "div_",
        "add",
        "add_",
        "sub",
        "sub_",
        "neg",
        "where",
        "masked_fill",
        "masked_fill_",
        "clamp",
        "clamp_",
        "clamp_min",
        "clamp_max",
        "tanh",
        "tanh_backward",
        "native_dropout",
        "native_dropout_backward",
        "copy_",
    )
    if hasattr(_aten, name)
)
# ops without FLOPs that eager attention is followed through (the softmax, its backward, what passes a tag on)
_FOLLOWED_WITHOUT_FLOPS = _SOFTMAX | _PASS_THROUGH | {_aten._softmax_backward_data}


@dataclass(eq=False)
class _MatmulCall:
    """One matmul as counted: enough to take part of its model FLOPs back once it is known to be attention."""

    packet: Any
    flops: int
    parents: tuple[str, ...]
    phase: str
    discounted: bool = False


@dataclass(eq=False)
class _EagerAttention:
    """One eager attention call: its score matmul, then the P·V matmul and the backward matmuls as they come."""

    matmuls: list[_MatmulCall]
    # The softmax output, held until the first matmul takes it (P·V, moments later; autograd saves it anyway).
    # A recomputation under activation checkpointing hands on a different tensor object: a weak reference
    # would be gone by then.
    probabilities: torch.Tensor | None = None
    causal: bool | None = None
    consumers: int = 0


# ---------------------------------------------------------------------------------- registered formulas
def _bind_shapes(packet: Any, formula: Callable[..., int], **extra: Any) -> Callable[..., int]:
    """FlopCounterMode calls ``f(*args, **kwargs, out_val=out)`` with raw tensors; call ``formula`` with shapes,
    defaults filled in, and ``extra`` keyword arguments."""

    @_raw
    @functools.wraps(formula)
    def counted(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        args, kwargs = _with_defaults(packet, args, kwargs)
        args, kwargs, out_shape = tree_map(_shape_of, (args, kwargs, out_val))
        return int(formula(*args, out_shape=out_shape, **extra, **kwargs))

    return counted


def register_flop_formula(
    op: Any, formula: Callable[..., int], hardware_formula: Callable[..., int] | None = None, *, attention: bool = False
) -> None:
    """Count ``op`` with ``formula`` in ``training_flop_counter`` and in every plain ``FlopCounterMode``.

    ``op``: ``torch.ops.ns.name`` (or one overload of it), the object ``torch.library.custom_op`` returns, or
    the string "ns::name". Calling convention: for each call of the op, ``formula`` receives

        formula(*args, out_shape=..., causal_attention="half" | "full", **kwargs) -> int

    where ``args`` are ALL the op schema's positional (not keyword-only) arguments in schema order, however the
    caller passed them (by keyword too), with defaults filled in, and ``kwargs`` all its keyword-only arguments
    (defaults filled in); every tensor is replaced by its ``torch.Size`` (inside lists and tuples too), other
    values (None, numbers, bools) are unchanged; ``out_shape`` is the op's output with tensors likewise replaced
    by shapes (a tuple for several outputs); ``causal_attention`` is the convention of the counter ("half"
    under a plain ``FlopCounterMode``: ``DEFAULT_CAUSAL_ATTENTION``). It returns the model FLOPs of that call (a
    multiply-add is 2), for the whole batch. A backward op is a separate op with its own formula (model FLOPs:
    2 × forward). Ops the custom op runs inside itself are not seen by the counter (no double count).

    ``hardware_formula`` (optional; same arguments, without ``causal_attention``) returns what the kernel really
    executes, e.g. a backward that recomputes its forward; by default the hardware FLOPs are ``formula`` under
    "half" (a causal kernel that skips the masked blocks).

    ``attention=True`` says the op is attention: its FLOPs are the scores and P·V, quadratic in the sequence
    length (``TrainingFlopCounter.attention_flops``). ``FlopCounter`` then needs one measured input shape fewer
    to predict the others (``lightning_scaling.flops.by_shape``); left False, the op's FLOPs count as linear in
    the tokens, which a second measured shape checks.

    Register at import time of the module that defines the op: ``training_flop_counter`` takes the formulas
    registered when it is created. Registering the same op again replaces our earlier formulas. An op that
    torch itself already counts is refused with ``ValueError``.
    """
    packet = _packet(op)
    if not callable(formula):
        raise ValueError(f"formula must be callable, got {formula!r}")
    if hardware_formula is not None and not callable(hardware_formula):
        raise ValueError(f"hardware_formula must be callable or None, got {hardware_formula!r}")
    if not isinstance(attention, bool):
        raise ValueError(f"attention must be True or False, got {attention!r}")
    registry = _torch_flop_counter.flop_registry
    previous = registry.get(packet)
    if previous is not None and not getattr(previous, _OURS, False):
        raise ValueError(f"op {packet} already has a FLOP formula in torch.utils.flop_counter; not replacing it")
    default = _bind_shapes(packet, formula, causal_attention=DEFAULT_CAUSAL_ATTENTION)
    setattr(default, _OURS, True)
    if previous is None:
        _torch_flop_counter.register_flop_formula(packet, get_raw=True)(default)
    else:
        registry[packet] = default  # torch's registration refuses duplicates; replace our own entry
    _REGISTERED[packet] = formula
    if hardware_formula is None:
        _REGISTERED_HARDWARE.pop(packet, None)
    else:
        _REGISTERED_HARDWARE[packet] = hardware_formula
    if attention:
        _REGISTERED_ATTENTION.add(packet)
    else:
        _REGISTERED_ATTENTION.discard(packet)


def registered_flop_formulas() -> dict[Any, Callable[..., int]]:
    """The (model) formulas registered with ``register_flop_formula``, by op packet (a copy)."""
    return dict(_REGISTERED)


# ----------------------------------------------------------------------------------- flex attention (HOPs)
def _flex_operators() -> tuple[Any, Any] | None:
    try:
        from torch._higher_order_ops.flex_attention import flex_attention, flex_attention_backward
    except ImportError:  # pragma: no cover - torch without flex attention
        return None
    return flex_attention, flex_attention_backward


_FLEX = _flex_operators()


def _counting_dispatch_mode() -> type | None:
    """Torch's dispatch mode behind ``FlopCounterMode``, plus flex attention (which torch's mode refuses to run:
    it returns NotImplemented for the operator). None if torch's internals changed: flex is then left to torch."""
    base = getattr(_torch_flop_counter, "_FlopCounterMode", None)
    if base is None or _FLEX is None or not hasattr(base, "_handle_higher_order_ops"):
        return None
    flex_operators = _FLEX

    class _CountingDispatchMode(base):  # type: ignore[misc, valid-type]
        def _handle_higher_order_ops(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
            if func in flex_operators:
                out = func(*args, **kwargs)  # this mode is popped here: the dense implementation is not counted
                return self.counter._count_flops(func, out, args, kwargs)
            return super()._handle_higher_order_ops(func, types, args, kwargs)

    return _CountingDispatchMode


_CountingDispatchMode = _counting_dispatch_mode()


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


# ------------------------------------------------------------------------------------------------ counter
_Handler = Callable[[tuple, dict, Any], "tuple[int, int, str | None]"]


class TrainingFlopCounter(FlopCounterMode):
    """A ``FlopCounterMode`` bound to one causal-attention convention that counts model FLOPs (forward and
    backward) and hardware FLOPs of every op, and recognises causal attention on every code path (module
    docstring).

    An op counts as backward when it runs inside the autograd engine (``loss.backward()``,
    ``torch.autograd.grad``): with activation checkpointing the recomputed forward lands in ``backward``.
    ``get_total_flops()`` and the per-module table (``display=True``) are model FLOPs.
    """

    def __init__(self, causal_attention: str = DEFAULT_CAUSAL_ATTENTION, display: bool = False, depth: int = 2) -> None:
        one_of("causal_attention", causal_attention, CAUSAL_ATTENTION_CONVENTIONS)
        self.causal_attention = causal_attention
        self._handlers: dict[Any, _Handler] = self._make_handlers()
        self._attention_packets = frozenset(
            packet
            for packet in self._handlers
            if packet in _SDPA_FORWARD
            or packet in _SDPA_BACKWARD
            or packet in _LOW_LEVEL
            or packet in _REGISTERED_ATTENTION
            or (_FLEX is not None and packet in _FLEX)
        )
        mapping = {
            packet: _raw(functools.partial(self._model_only, handler)) for packet, handler in self._handlers.items()
        }
        super().__init__(display=display, depth=depth, custom_mapping=mapping)
        self.phase_counts: dict[str, dict[Any, int]] = {"forward": defaultdict(int), "backward": defaultdict(int)}
        self.hardware_counts: dict[str, dict[Any, int]] = {"forward": defaultdict(int), "backward": defaultdict(int)}
        self._attention_calls: dict[str, int] = defaultdict(int)
        self._tags: dict[int, tuple[StorageWeakRef, tuple[str, Any]]] = {}
        self._mask_verdicts: dict[tuple, tuple[StorageWeakRef, bool]] = {}
        # the last mask checked, by layout: (the mask, its version when checked, the verdict)
        self._masks_by_layout: dict[tuple, tuple[torch.Tensor, int, bool]] = {}
        self._flex_verdicts: dict[tuple, bool] = {}
        # attention's FLOPs by phase: [model, hardware] of the fused, flex and registered attention calls
        self._fused_attention: dict[str, list[int]] = {"forward": [0, 0], "backward": [0, 0]}
        self._eager_attention_matmuls: dict[int, _MatmulCall] = {}  # by id: the matmuls of eager attention

    # ------------------------------------------------------------------------------------------ public
    @property
    def forward_flops(self) -> int:
        """Model FLOPs of the ops run outside the autograd engine."""
        return sum(self.phase_counts["forward"].values())

    @property
    def backward_flops(self) -> int:
        """Model FLOPs of the ops run inside the autograd engine (recomputation included)."""
        return sum(self.phase_counts["backward"].values())

    @property
    def hardware_forward_flops(self) -> int:
        """FLOPs the kernels executed outside the autograd engine."""
        return sum(self.hardware_counts["forward"].values())

    @property
    def hardware_backward_flops(self) -> int:
        """FLOPs the kernels executed inside the autograd engine (recomputed scores and forwards included)."""
        return sum(self.hardware_counts["backward"].values())

    @property
    def hardware_flops(self) -> int:
        """FLOPs the kernels executed, forward and backward (HFU's numerator; independent of the convention)."""
        return self.hardware_forward_flops + self.hardware_backward_flops

    @property
    def attention_calls(self) -> dict[str, int]:
        """Forward attention calls (outside the autograd engine) by how they were recognised: keys from
        ``ATTENTION_PATHS``, e.g. ``{"eager:causal_mask": 2}``."""
        return {path: n for path, n in self._attention_calls.items() if n}

    @property
    def attention_flops(self) -> dict[str, tuple[int, int]]:
        """(model, hardware) FLOPs of the attention calls, by phase ("forward", "backward"): the scores and P·V
        (and their gradients) of fused, flex, eager and registered attention (``register_flop_formula(...,
        attention=True)``), the part of a transformer's FLOPs that is quadratic in the sequence length."""
        totals = {phase: list(counts) for phase, counts in self._fused_attention.items()}
        for call in self._eager_attention_matmuls.values():
            totals[call.phase][0] += call.flops - (call.flops // 2 if call.discounted else 0)
            totals[call.phase][1] += call.flops
        return {phase: (model, hardware) for phase, (model, hardware) in totals.items()}

    # --------------------------------------------------------------------------------- context manager
    def __enter__(self) -> TrainingFlopCounter:
        for counts in (*self.phase_counts.values(), *self.hardware_counts.values()):
            counts.clear()
        self._attention_calls.clear()
        self._fused_attention = {"forward": [0, 0], "backward": [0, 0]}
        self._eager_attention_matmuls.clear()
        self._forget()
        if _CountingDispatchMode is None or not hasattr(self, "mod_tracker"):
            super().__enter__()
            return self
        # FlopCounterMode.__enter__ with our dispatch mode (torch 2.13: flop_counts, mod_tracker, mode)
        self.flop_counts.clear()
        self.mod_tracker.__enter__()
        self.mode = _CountingDispatchMode(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *args: object) -> Any:
        try:
            return super().__exit__(*args)
        finally:
            self._forget()

    def _forget(self) -> None:
        self._tags.clear()
        self._mask_verdicts.clear()
        self._masks_by_layout.clear()
        self._flex_verdicts.clear()

    # ----------------------------------------------------------------------------------------- counting
    @staticmethod
    def _model_only(handler: _Handler, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return handler(args, kwargs, out_val)[0]

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        handler = self._handlers.get(func_packet)
        if handler is None and func_packet not in self.flop_registry:
            # most ops of a step (elementwise, views, reductions) cost no FLOPs: only eager attention follows them
            if func_packet in _FOLLOWED_WITHOUT_FLOPS:
                self._follow_eager_attention(func_packet, out, args, kwargs, 0, (), "")
            return out
        phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        model = hardware = 0
        if handler is not None:
            model, hardware, path = handler(args, kwargs, out)
            if path is not None and phase == "forward":
                self._attention_calls[path] += 1
            if func_packet in self._attention_packets:
                totals = self._fused_attention[phase]
                totals[0] += model
                totals[1] += hardware
        elif func_packet in self.flop_registry:
            model = hardware = int(self.flop_registry[func_packet](*args, **kwargs, out_val=out))
        parents: tuple[str, ...] = ()
        if model or hardware:
            parents = tuple(set(self.mod_tracker.parents))
            for parent in parents:
                self.flop_counts[parent][func_packet] += model
            self.phase_counts[phase][func_packet] += model
            self.hardware_counts[phase][func_packet] += hardware
        self._follow_eager_attention(func_packet, out, args, kwargs, model, parents, phase)
        return out

    # ------------------------------------------------------------------------------- fused attention
    def _make_handlers(self) -> dict[Any, _Handler]:
        handlers: dict[Any, _Handler] = {}
        for packet in _SDPA_FORWARD:
            handlers[packet] = self._sdpa_handler(packet, backward=False)
        for packet in _SDPA_BACKWARD:
            handlers[packet] = self._sdpa_handler(packet, backward=True)
        for packet, (causal_arg, backward) in _LOW_LEVEL.items():
            if packet in _torch_flop_counter.flop_registry:
                handlers[packet] = self._low_level_handler(packet, causal_arg, backward)
        if _FLEX is not None:
            handlers[_FLEX[0]] = functools.partial(self._flex_handler, False)
            handlers[_FLEX[1]] = functools.partial(self._flex_handler, True)
        for packet, formula in _REGISTERED.items():
            handlers[packet] = self._registered_handler(packet, formula, _REGISTERED_HARDWARE.get(packet))
        return handlers

    def _causal_mask(self, mask: Any, s_q: int, s_k: int) -> bool:
        """``_mask_is_causal``, remembered per mask tensor (every layer gets the same mask) and version, and per
        mask value: torch's SDPA turns a boolean mask into a new float one in every layer, and comparing a small
        mask (``_comparable``) with the last one of its layout costs less than the check."""
        if not isinstance(mask, torch.Tensor):
            return False
        try:
            storage = mask.untyped_storage()
            key = (
                storage._cdata,
                mask.storage_offset(),
                tuple(mask.shape),
                tuple(mask.stride()),
                mask.dtype,
                mask._version,
                s_q,
                s_k,
            )
        except (RuntimeError, NotImplementedError, TypeError):  # no storage (a subclass, a fake tensor)
            return False
        cached = self._mask_verdicts.get(key)
        if cached is None or cached[0].expired():  # expired: another tensor now lives at that address
            layout = key[2:5] + key[6:]
            seen = self._masks_by_layout.get(layout)
            comparable = _comparable(mask)
            if (
                comparable
                and seen is not None
                and seen[0]._version == seen[1]  # the kept mask was not changed in place since its check
                and _same_values(mask, seen[0])
            ):
                verdict = seen[2]
            else:
                verdict = _mask_is_causal(mask, s_q, s_k)
                if comparable:
                    # the mask is kept until the counter closes (autograd keeps it for the backward anyway); the
                    # tensor itself, not an alias: an alias made under the dispatch mode has a version of its own
                    self._masks_by_layout[layout] = (mask, mask._version, verdict)
            cached = (StorageWeakRef(storage), verdict)
            self._mask_verdicts[key] = cached
        return cached[1]

    def _attention_counts(
        self, dims: tuple[int, int, int, int, int, int], flagged: bool, mask: Any, backward: bool
    ) -> tuple[int, int, str | None]:
        """(model, hardware, path) of a dense fused attention call; ``dims`` = (B, H, Sq, Sk, Dq, Dv)."""
        causal_mask = not flagged and self._causal_mask(mask, dims[2], dims[3])
        model = _scaled(_square(*dims), causal_attention_factor(flagged or causal_mask, self.causal_attention))
        skipped = 0.5 if flagged else 1.0  # a kernel told is_causal skips the upper triangle; a masked one cannot
        if backward:
            return 2 * model, _scaled(_recomputing_backward(*dims), skipped), None
        path = "fused:causal" if flagged else "fused:causal_mask" if causal_mask else "fused:full"
        return model, _scaled(_square(*dims), skipped), path

    def _sdpa_handler(self, packet: Any, backward: bool) -> _Handler:
        torch_formula = _torch_flop_counter.flop_registry.get(packet)

        def handler(args: tuple, kwargs: dict, out: Any) -> tuple[int, int, str | None]:
            bound = _bind(packet, args, kwargs)
            q, k, v = (None, None, None) if bound is None else (bound["query"], bound["key"], bound["value"])
            if bound is None or not all(
                isinstance(t, torch.Tensor) and not t.is_nested and t.dim() == 4 for t in (q, k, v)
            ):
                # Nested or unusual layouts: torch's own count (full attention, 2.5x backward)
                flops = int(torch_formula(*args, out_val=out, **kwargs)) if torch_formula else 0
                return flops, flops, None if backward else "fused:full"
            assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            b, h, s_q, d_q = q.shape
            dims = (b, h, s_q, k.shape[-2], d_q, v.shape[-1])
            return self._attention_counts(dims, bool(bound["is_causal"]), _mask_argument(bound), backward)

        return handler

    def _low_level_handler(self, packet: Any, causal_arg: str, backward: bool) -> _Handler:
        torch_formula = _torch_flop_counter.flop_registry[packet]
        varlen_arg = "cum_seq_q" if "flash" in str(packet) else "cu_seqlens_q"

        def handler(args: tuple, kwargs: dict, out: Any) -> tuple[int, int, str | None]:
            bound = _bind(packet, args, kwargs)
            if bound is None:
                flops = int(torch_formula(*args, out_val=out, **kwargs))
                return flops, flops, None
            q, k, v = bound["query"], bound["key"], bound["value"]
            flagged = bool(bound[causal_arg])
            if bound[varlen_arg] is None and q.dim() == 4:
                # Dense: these ops take [B, S, H, D]; torch reads [B, H, S, D] and so miscounts them (torch 2.13)
                b, s_q, h, d_q = q.shape
                dims = (b, h, s_q, k.shape[1], d_q, v.shape[-1])
                return self._attention_counts(dims, flagged, _mask_argument(bound), backward)
            # Variable length: torch's per-sequence count (full attention), rescaled to our convention
            counted = int(torch_formula(*args, out_val=out, **kwargs))
            model_factor = causal_attention_factor(flagged, self.causal_attention)
            hardware = _scaled(counted, 0.5 if flagged else 1.0)
            if backward:
                # torch counts 2·BHSqSk·(3Dq + 2Dv) (recomputed scores included); model FLOPs are 2·BHSqSk·(2Dq + 2Dv)
                d_q, d_v = q.shape[-1], v.shape[-1]
                return int(counted * model_factor * (2 * d_q + 2 * d_v) / (3 * d_q + 2 * d_v)), hardware, None
            path = "fused:causal" if flagged else "fused:full"
            return int(counted * model_factor), hardware, path

        return handler

    def _flex_handler(self, backward: bool, args: tuple, kwargs: dict, out: Any) -> tuple[int, int, str | None]:
        q, k, v = _arg(args, kwargs, 0, "query"), _arg(args, kwargs, 1, "key"), _arg(args, kwargs, 2, "value")
        block_mask = _arg(args, kwargs, 9, "block_mask") if backward else _arg(args, kwargs, 4, "block_mask")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            return 0, 0, None
        b, h, s_q, d_q = q.shape
        dims = (b, h, s_q, k.shape[-2], d_q, v.shape[-1])
        causal = self._flex_mask_is_causal(block_mask, q.device, s_q, k.shape[-2])
        model = _scaled(_square(*dims), causal_attention_factor(causal, self.causal_attention))
        computed = _flex_computed_fraction(block_mask, s_q, k.shape[-2])
        if backward:
            return 2 * model, int(_recomputing_backward(*dims) * computed), None
        return model, int(_square(*dims) * computed), "flex:causal_mask" if causal else "flex:full"

    def _flex_mask_is_causal(self, block_mask: Any, device: torch.device, s_q: int, s_k: int) -> bool:
        """The block mask's ``mask_mod`` evaluated on batch 0, head 0 (a strided sample of query rows)."""
        mask_mod = block_mask[-1] if isinstance(block_mask, tuple) and block_mask else None
        if not callable(mask_mod) or s_q != s_k or s_q < 2 or device.type == "meta":
            return False
        key = (mask_mod, s_q, s_k)  # the function itself: the cache holds it, so it cannot be confused with another
        if key not in self._flex_verdicts:
            try:
                with torch.no_grad():
                    n_rows = min(s_q, max(1, MASK_CHECK_ELEMENTS // s_k))
                    query = torch.arange(n_rows, device=device) * (s_q - 1) // max(n_rows - 1, 1)
                    zero = torch.zeros((), dtype=torch.long, device=device)
                    allowed = mask_mod(zero, zero, query[:, None], torch.arange(s_k, device=device)[None, :])
                    allowed = torch.broadcast_to(torch.as_tensor(allowed, device=device), (n_rows, s_k)).bool()
                    self._flex_verdicts[key] = _causal_pattern(allowed, query)
            except Exception:  # noqa: BLE001 - a mask_mod that needs vmap or a compiled context: not recognised
                self._flex_verdicts[key] = False
        return self._flex_verdicts[key]

    # ------------------------------------------------------------------------------- registered ops
    def _registered_handler(
        self, packet: Any, formula: Callable[..., int], hardware_formula: Callable[..., int] | None
    ) -> _Handler:
        model_formula = _bind_shapes(packet, formula, causal_attention=self.causal_attention)
        if hardware_formula is None:
            hardware_of = (
                model_formula
                if self.causal_attention == "half"
                else _bind_shapes(packet, formula, causal_attention="half")
            )
        else:
            hardware_of = _bind_shapes(packet, hardware_formula)

        def handler(args: tuple, kwargs: dict, out: Any) -> tuple[int, int, str | None]:
            model = model_formula(*args, out_val=out, **kwargs)
            hardware = model if hardware_of is model_formula else hardware_of(*args, out_val=out, **kwargs)
            return model, hardware, None

        return handler

    # ------------------------------------------------------------------------------- eager attention
    def _tag_of(self, t: Any) -> tuple[str, Any] | None:
        if not self._tags or not isinstance(t, torch.Tensor):
            return None
        try:
            key = t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        entry = self._tags.get(key)
        if entry is None:
            return None
        if entry[0].expired():
            del self._tags[key]
            return None
        return entry[1]

    def _set_tag(self, t: Any, tag: tuple[str, Any]) -> None:
        if isinstance(t, (tuple, list)):
            t = t[0] if t else None
        if not isinstance(t, torch.Tensor):
            return
        try:
            storage = t.untyped_storage()
            # The weak reference keeps the storage's address from being reused while the tag lives.
            self._tags[storage._cdata] = (StorageWeakRef(storage), tag)
        except (RuntimeError, NotImplementedError, TypeError):
            pass

    def _discount(self, call: _MatmulCall) -> None:
        """Take back half of a causal attention matmul's model FLOPs under "half" (hardware FLOPs keep it all)."""
        if self.causal_attention != "half" or call.discounted:
            return
        call.discounted = True
        half = call.flops // 2
        for parent in call.parents:
            self.flop_counts[parent][call.packet] -= half
        self.phase_counts[call.phase][call.packet] -= half

    def _link(self, attention: _EagerAttention, call: _MatmulCall) -> None:
        attention.matmuls.append(call)
        self._eager_attention_matmuls[id(call)] = call
        if attention.causal:
            self._discount(call)

    def _follow_eager_attention(
        self, packet: Any, out: Any, args: tuple, kwargs: dict, model: int, parents: tuple[str, ...], phase: str
    ) -> None:
        """Follow eager attention through the ops: the score matmul (batched), the softmax, the P·V matmul,
        and in the backward the softmax backward, dP, dV, dQ and dK. The P·V matmul decides causality."""
        if packet in _MATMULS:
            call = _MatmulCall(packet, model, parents, phase)
            operands = args[1:3] if packet in (_aten.addmm, _aten.baddbmm) else args[:2]
            for position, operand in enumerate(operands):
                tag = self._tag_of(operand)
                if tag is None or tag[0] == "scores":
                    continue
                kind, attention = tag
                if kind == "probs":
                    if attention.consumers == 0 and attention.causal is None:
                        # The first matmul to take the probabilities is P·V (or, in a recomputation that stops
                        # at the softmax, dV). The softmax output is read first (dropout has not touched it:
                        # padding rows are whole), then what P·V takes (a mask applied after the softmax).
                        probabilities, attention.probabilities = attention.probabilities, None
                        causal = (probabilities is not None and _probabilities_are_causal(probabilities)) or (
                            position == 0 and _probabilities_are_causal(operand)
                        )
                        attention.causal = causal
                        if phase == "forward":
                            self._attention_calls["eager:causal_mask" if causal else "eager:full"] += 1
                        if causal:
                            for earlier in attention.matmuls:
                                self._discount(earlier)
                    attention.consumers += 1
                self._link(attention, call)  # P·V, dV (probs) or dQ, dK (score gradients)
                break
            if packet in _SCORE_MATMULS:
                self._set_tag(out, ("scores", call))
        elif packet in _SOFTMAX:
            tag = self._tag_of(args[0])
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if tag is not None and tag[0] == "scores" and isinstance(dim, int) and dim in (-1, args[0].dim() - 1):
                probabilities = out if isinstance(out, torch.Tensor) else None
                self._eager_attention_matmuls[id(tag[1])] = tag[1]  # the score matmul
                self._set_tag(out, ("probs", _EagerAttention([tag[1]], probabilities)))
        elif packet is _aten._softmax_backward_data:
            tag = self._tag_of(args[1])  # the softmax output, saved for backward
            if tag is not None and tag[0] == "probs":
                gradient = self._tag_of(args[0])
                if gradient is not None and gradient[0] == "scores":
                    self._link(tag[1], gradient[1])  # dP = dO·Vᵀ, known only now
                self._set_tag(out, ("score_grads", tag[1]))
        elif packet in _PASS_THROUGH and self._tags:
            for value in (*args, *kwargs.values()):
                tag = self._tag_of(value)
                if tag is not None:
                    self._set_tag(out, tag)
                    break


def _flex_computed_fraction(block_mask: Any, s_q: int, s_k: int) -> float:
    """The fraction of the S×S square a flex kernel computes: its blocks (partial and full) over all blocks."""
    try:
        kv_num_blocks, full_kv_num_blocks = block_mask[2], block_mask[4]
        q_block, kv_block = int(block_mask[-3]), int(block_mask[-2])
        computed = int(kv_num_blocks.sum().item())
        if full_kv_num_blocks is not None:
            computed += int(full_kv_num_blocks.sum().item())
        batch_heads = math.prod(kv_num_blocks.shape[:-1])
        return min(1.0, computed * q_block * kv_block / (batch_heads * s_q * s_k))
    except (AttributeError, IndexError, RuntimeError, TypeError, ValueError, ZeroDivisionError):
        return 1.0


def training_flop_counter(
    causal_attention: str = DEFAULT_CAUSAL_ATTENTION, display: bool = False
) -> TrainingFlopCounter:
    """A ``TrainingFlopCounter`` (context manager): model FLOPs under ``causal_attention`` ("half" or "full"),
    causal attention recognised on every path (``is_causal``, causal masks, eager attention, flex attention),
    hardware FLOPs beside them, and every ``register_flop_formula`` op. ``display=True`` prints torch's
    per-module table of model FLOPs on exit (needs ``tabulate``)."""
    return TrainingFlopCounter(causal_attention=causal_attention, display=display)


@dataclass(frozen=True)
class MeasuredFlops:
    """FLOPs counted while running one training step (whatever ``fn`` ran: usually the whole batch).

    ``total``/``forward``/``backward``: model FLOPs (``forward``/``backward`` split by whether the op ran inside
    the autograd engine); ``by_op`` maps op name ("aten.mm") to model FLOPs; ``hardware``: FLOPs the kernels
    executed; ``attention``: forward attention calls by how they were recognised (``ATTENTION_PATHS``);
    ``attention_flops``: (model, hardware) FLOPs of those calls, forward and backward as in ``total`` and
    ``hardware`` (the part quadratic in the sequence length)."""

    total: int
    forward: int
    backward: int
    causal_attention: str
    by_op: dict[str, int] = field(default_factory=dict)
    hardware: int = 0
    attention: dict[str, int] = field(default_factory=dict)
    attention_flops: tuple[int, int] = (0, 0)


def measure_training_flops(fn: Callable[[], Any], causal_attention: str = DEFAULT_CAUSAL_ATTENTION) -> MeasuredFlops:
    """Run ``fn()`` (forward, loss and backward of one batch) under ``training_flop_counter`` and return its FLOPs."""
    if not callable(fn):
        raise ValueError(f"fn must be a callable taking no arguments, got {fn!r}")
    counter = training_flop_counter(causal_attention)
    with counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items() if n}
    by_phase = counter.attention_flops  # (model, hardware) by phase
    (forward, forward_hw), (backward, backward_hw) = by_phase["forward"], by_phase["backward"]
    return MeasuredFlops(
        total=int(counter.get_total_flops()),
        forward=counter.forward_flops,
        backward=counter.backward_flops,
        causal_attention=causal_attention,
        by_op=by_op,
        hardware=counter.hardware_flops,
        attention=counter.attention_calls,
        attention_flops=(forward + backward, forward_hw + backward_hw),
    )


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
