"""``nn.Module`` drop-ins for the example GPT's blocks, backed by the fused ops.

Parameter names match ``examples/gpt.py`` (``qkv``/``proj``; ``gate``/``up``/``down``, all without bias), so a
state dict loads into either version.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_scaling.kernels.ops.attention import flash_attention
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
