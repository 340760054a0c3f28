"""``nn.Module`` drop-ins backed by the fused ops.

Parameter names match what they replace, so a state dict loads into either version: ``examples/gpt.py``'s blocks
(``qkv``/``proj``; ``gate``/``up``/``down``, all without bias) for ``FusedSelfAttention`` and ``FusedSwiGLU``;
``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` (``weight``, ``bias``) for ``FusedLayerNorm`` and
``FusedRMSNorm``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_scaling.kernels.ops.attention import flash_attention
from lightning_scaling.kernels.ops.norm import fused_layer_norm, fused_rms_norm
from lightning_scaling.kernels.ops.swiglu_gemm import swiglu_gate_up
from lightning_scaling.kernels.ops.swiglu_mlp import swiglu_mlp

SWIGLU_FUSIONS = ("elementwise", "gemm")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


class FusedSelfAttention(nn.Module):
    """Multi-head self-attention with the fused attention op: input and output [batch, seq, d_model].

    ``qkv`` (d_model → 3·d_model) is split into q, k, v as in ``examples/gpt.py`` (view [B, S, 3, H, D]);
    ``proj`` (d_model → d_model). ``causal=True`` masks future positions. The Triton kernels (CUDA) need
    head_dim = d_model / n_head in {16, 32, 64, 128}; the CPU path takes any.
    """

    def __init__(self, d_model: int, n_head: int, causal: bool = True) -> None:
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("n_head", n_head)
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be True or False, got {causal!r}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x must be [batch, seq, d_model={self.qkv.in_features}], got {tuple(x.shape)}")
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        y = flash_attention(q, k, v, causal=self.causal)  # strided views: the kernels take any strides
        return self.proj(y.transpose(1, 2).reshape(b, s, d))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, head_dim={self.head_dim}, causal={self.causal}"


class FusedSwiGLU(nn.Module):
    """SwiGLU MLP ``down(silu(gate(x)) * up(x))`` with a fused gate: input and output [..., d_model].

    ``gate`` and ``up`` (d_model → d_ff) and ``down`` (d_ff → d_model), no bias, as in ``examples/gpt.py``; the
    forward uses their weights directly (hooks on the three ``nn.Linear`` submodules do not run).
    ``fusion`` picks the kernels, trading recomputation for activation memory (saved [tokens, d_ff] tensors,
    against eager PyTorch's four):

    - ``"elementwise"`` (default): cuBLAS GEMMs and one Triton kernel each way for ``silu(g) * u``; keeps ``g``
      and ``u``, and the backward's kernel writes the product again for ``down``'s weight gradient: two of
      four (0.5 x), no extra FLOPs.
    - ``"gemm"``: one Triton GEMM computes both projections with the SwiGLU epilogue and writes only the
      product; the backward recomputes the GEMMs: one of four (0.25 x), 4·tokens·d_model·d_ff more hardware
      FLOPs per step.

    ``benchmarks/mlp.py`` measures both against eager on a GPU (see benchmarks/RESULTS.md).
    """

    def __init__(self, d_model: int, d_ff: int, fusion: str = "elementwise") -> None:
        super().__init__()
        _positive_int("d_model", d_model)
        _positive_int("d_ff", d_ff)
        if fusion not in SWIGLU_FUSIONS:
            raise ValueError(f"fusion must be one of {SWIGLU_FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.gate.in_features:
            raise ValueError(f"x must end in d_model={self.gate.in_features}, got shape {tuple(x.shape)}")
        if self.fusion == "gemm":
            return self.down(swiglu_gate_up(x, self.gate.weight, self.up.weight))
        return swiglu_mlp(x, self.gate.weight, self.up.weight, self.down.weight)

    def extra_repr(self) -> str:
        return f"fusion={self.fusion!r}"


def _width(normalized_shape: int | Sequence[int]) -> int:
    """H from ``normalized_shape``: an int or a one-element sequence (the fused norms take the last dimension)."""
    if isinstance(normalized_shape, int) and not isinstance(normalized_shape, bool):
        shape: tuple = (normalized_shape,)
    # a str is a Sequence too (of str, which the annotation rules out; untyped callers can still pass one)
    elif isinstance(normalized_shape, Sequence) and not isinstance(normalized_shape, str):  # type: ignore[unreachable]
        shape = tuple(normalized_shape)
    else:
        raise ValueError(f"normalized_shape must be an int or a one-element sequence, got {normalized_shape!r}")
    if len(shape) != 1:
        raise ValueError(
            f"normalized_shape must name one dimension (the fused norms normalise the last one), "
            f"got {normalized_shape!r}"
        )
    return _positive_int("normalized_shape", shape[0])


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


class _FusedNorm(nn.Module):
    """What ``FusedLayerNorm`` and ``FusedRMSNorm`` share: the parameters, the per-example squared norms."""

    per_example_sq_norms: torch.Tensor | None
    weight: nn.Parameter | None  # None without elementwise_affine
    bias: nn.Parameter | None  # None without elementwise_affine or bias

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None,
        elementwise_affine: bool,
        bias: bool,
        record_per_example_norms: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        width = _width(normalized_shape)
        if eps is not None and (
            isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0)
        ):
            raise ValueError(f"eps must be a finite number >= 0 (or None for RMSNorm), got {eps!r}")
        self.normalized_shape = (width,)
        self.eps = eps
        self.elementwise_affine = _flag("elementwise_affine", elementwise_affine)
        self.record_per_example_norms = _flag("record_per_example_norms", record_per_example_norms)
        _flag("bias", bias)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(width, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.per_example_sq_norms = None
        self._per_example_sink: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        """Weight ones, bias zeros (as torch's norms)."""
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _sink(self, x: torch.Tensor) -> torch.Tensor | None:
        """The [examples] leaf whose gradient the backward fills with the per-example squared norms; None when
        nothing is to be recorded.

        One leaf is kept and reused while the number of examples, dtype and device stay the same, so that
        ``torch.compile`` traces it as an input (a leaf made inside the forward would break the graph); its
        post-accumulate hook moves each gradient into ``per_example_sq_norms``."""
        trained = any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        if not (self.record_per_example_norms and trained and torch.is_grad_enabled()):
            return None
        examples = 1 if x.dim() == 1 else x.shape[0]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sink = self._per_example_sink
        if sink is None or sink.shape[0] != examples or sink.dtype != dtype or sink.device != x.device:
            sink = torch.zeros(examples, dtype=dtype, device=x.device, requires_grad=True)
            sink.register_post_accumulate_grad_hook(self._record)
            self._per_example_sink = sink
        return sink

    def _record(self, sink: torch.Tensor) -> None:
        self.per_example_sq_norms = sink.grad.detach() if sink.grad is not None else None
        sink.grad = None

    def __getstate__(self) -> dict:
        # Copies and pickles drop the sink: a copied tensor loses its hook. The next forward makes a new one.
        state = self.__dict__.copy()
        state["_per_example_sink"] = None
        return state

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.normalized_shape[0]:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must end in normalized_shape={self.normalized_shape[0]}, got shape {shape}")

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"record_per_example_norms={self.record_per_example_norms}"
        )


class FusedLayerNorm(_FusedNorm):
    """``torch.nn.LayerNorm`` over the last dimension on the fused norm op, recording each example's squared
    gradient norm for this layer's parameters in the backward (Gray et al. 2024, arXiv 2411.00999).

    Same arguments, parameters and state-dict keys as ``nn.LayerNorm`` (``weight`` [H], ``bias`` [H]), except
    that ``normalized_shape`` must name one dimension. Input and output [B, ..., H]: the first dimension indexes
    examples (for [B, T, H], example b is x[b]; for [N, H] every row is an example). fp16/bf16/fp32 are computed
    in fp32; the output has x's dtype (also when the parameters are fp32 under autocast, where nn.LayerNorm
    would return fp32).

    ``per_example_sq_norms``: after each backward that reaches this layer's parameters, a float32 tensor [B]
    (float64 for float64 inputs) holding |g_b(weight)|² + |g_b(bias)|², the squared L2 norm of example b's
    gradient with respect to the weight and bias together, taken from the gradient as it flowed (it carries the
    loss's 1/B for a mean over the batch, the AMP loss scale, Lightning's 1/accumulate_grad_batches: rescale
    before use); None before the first backward. Each backward overwrites it, so with gradient accumulation
    read it after every backward (``on_after_backward``). It holds the per-example norms of one forward call:
    a layer called twice before one backward (shared weights) records the call whose backward ran last, not the
    norm of the summed gradient. Under activation checkpointing it is recorded once per backward.
    ``record_per_example_norms=False`` turns the recording off (same kernels; the [B] result is not kept).
    Without ``elementwise_affine`` there are no parameters and nothing is recorded.
    """

    eps: float  # never None for LayerNorm (checked in __init__)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        record_per_example_norms: bool = True,
    ) -> None:
        if eps is None:
            raise ValueError("eps must be a finite number >= 0 for LayerNorm, got None")
        super().__init__(normalized_shape, eps, elementwise_affine, bias, record_per_example_norms, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.weight is None:
            return F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        return fused_layer_norm(x, self.weight, self.bias, self.eps, per_example_sink=self._sink(x))


class FusedRMSNorm(_FusedNorm):
    """``torch.nn.RMSNorm`` over the last dimension on the fused norm op, recording each example's squared
    gradient norm |g_b(weight)|² for its weight in the backward; see ``FusedLayerNorm`` for shapes, dtypes and
    ``per_example_sq_norms``.

    Same arguments, parameter and state-dict key as ``nn.RMSNorm`` (``weight`` [H]); ``eps`` None means
    ``torch.finfo(x.dtype).eps``, as there.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        record_per_example_norms: bool = True,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, record_per_example_norms, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.weight is None:
            return F.rms_norm(x, self.normalized_shape, None, self.eps)
        return fused_rms_norm(x, self.weight, self.eps, per_example_sink=self._sink(x))
