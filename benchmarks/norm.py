"""Benchmark: the fused LayerNorm/RMSNorm, whose backward writes each example's squared gradient norm as a
by-product (Gray et al. 2024, arXiv 2411.00999), against torch's native norm with and without a separate
per-example computation, bf16, on a CUDA GPU.

For LayerNorm (with bias) and RMSNorm at batch 8 × 2048 tokens and widths H in (1024, 4096, 8192), four
variants with the same weights:

- ``torch``: ``nn.LayerNorm`` / ``nn.RMSNorm``, no per-example norms;
- ``torch + per-example``: the same, with the per-example norms formed as a pure-PyTorch path would: a hook on
  the output's gradient recomputes x̂ in fp32 (``F.layer_norm`` / ``F.rms_norm`` without affine), reduces
  dy ⊙ x̂ (and dy) over each example's tokens (``einsum``) and squares;
- ``fused``: ``FusedLayerNorm`` / ``FusedRMSNorm`` recording the norms;
- ``fused, no per-example``: the same with ``record_per_example_norms=False`` (what the by-product costs).

Columns: median time (``triton.testing.do_bench``) of forward, backward and forward+backward; GB/s of the least
traffic a norm needs (forward reads x and writes y, backward reads x and dy and writes dx: 2 and 3 ×
tokens·H·2 bytes; parameters and statistics left out); speed against ``torch`` and against
``torch + per-example``; peak memory of one forward+backward; and, from one backward against a float64
reference of the same bf16 inputs, the largest error of dx and dw relative to their largest value and of the
per-example squared norms relative to each. The script exits 1 when the fused variant's norms are off by more
than ``NORM_RTOL`` or its dx or dw error exceeds twice torch's own bf16 error plus ``GRAD_FLOOR``.

Run: ``python benchmarks/norm.py`` (``--markdown`` for a table to paste into benchmarks/RESULTS.md). Without a
CUDA GPU it prints why and exits 0. Target on H100/H200 bf16: forward+backward of ``fused`` at least as fast as
``torch`` alone (the norms for free), and faster than ``torch + per-example``.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _table import print_table  # benchmarks/ is on sys.path when run as a script
from torch import nn

NORM_RTOL = 1e-3
GRAD_FLOOR = 1e-3
EPS = 1e-5
VARIANTS = ("torch", "torch + per-example", "fused", "fused, no per-example")


class TorchNormWithPerExample(nn.Module):
    """A torch norm plus the per-example squared norms computed separately in the backward (the baseline)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.per_example_sq_norms: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if torch.is_grad_enabled():
            saved = x.detach()
            y.register_hook(lambda dy: self._per_example(saved, dy))
        return y

    def _per_example(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        width = (x.shape[-1],)
        xf = x.float()
        xhat = F.rms_norm(xf, width, eps=EPS) if isinstance(self.norm, nn.RMSNorm) else F.layer_norm(xf, width, eps=EPS)
        dyf = dy.float()
        sq = torch.einsum("bth,bth->bh", dyf, xhat).square().sum(1)
        if getattr(self.norm, "bias", None) is not None:
            sq = sq + dyf.sum(1).square().sum(1)
        self.per_example_sq_norms = sq


def _bench(fn, grad_to_none) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median")


def reference(
    kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dy: torch.Tensor
) -> dict[str, torch.Tensor]:
    """dx, dw and the per-example squared norms in float64 from the same (bf16) inputs."""
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = None if bias is None else bias.double().requires_grad_()
    if kind == "rms":
        xhat = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + EPS)
    else:
        centred = x64 - x64.mean(-1, keepdim=True)
        xhat = centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + EPS)
    y = xhat * w64 + (0 if b64 is None else b64)
    dy64 = dy.double()
    dx, dw = torch.autograd.grad(y, [x64, w64], dy64)
    sq = torch.einsum("bth,bth->bh", dy64, xhat.detach()).square().sum(1)
    if bias is not None:
        sq = sq + dy64.sum(1).square().sum(1)
    return {"dx": dx, "dw": dw, "sq": sq}


def errors(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor, exact: dict[str, torch.Tensor], norms_of: nn.Module | None
) -> dict[str, float]:
    xg = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    module(xg).backward(dy)
    weight = next(module.parameters())
    rel = lambda got, ref: ((got.double() - ref).abs().max() / ref.abs().max()).item()
    out = {"dx": rel(xg.grad, exact["dx"]), "dw": rel(weight.grad, exact["dw"])}
    if norms_of is not None:
        norms: torch.Tensor = norms_of.per_example_sq_norms  # type: ignore[assignment]
        out["sq"] = ((norms.double() - exact["sq"]).abs() / exact["sq"]).max().item()
    return out


def measure(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, float]:
    x = x.detach().requires_grad_()
    params = [x, *module.parameters()]

    def forward_backward():
        module(x).backward(dy)

    graph = module(x)
    result = {
        "fwd": _bench(lambda: module(x), None),
        "bwd": _bench(lambda: graph.backward(dy, retain_graph=True), params),
        "fwd+bwd": _bench(forward_backward, params),
    }
    graph = None
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def variants(kind: str, width: int) -> dict[str, nn.Module]:
    from lightning_scaling.kernels.modules import FusedLayerNorm, FusedRMSNorm

    torch.manual_seed(0)
    native = nn.RMSNorm(width, eps=EPS) if kind == "rms" else nn.LayerNorm(width, eps=EPS)
    with torch.no_grad():
        for p in native.parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p))
    made = {"torch": native, "torch + per-example": TorchNormWithPerExample(native)}
    for name, record in (("fused", True), ("fused, no per-example", False)):
        fused = (
            FusedRMSNorm(width, eps=EPS, record_per_example_norms=record)
            if kind == "rms"
            else FusedLayerNorm(width, eps=EPS, record_per_example_norms=record)
        )
        fused.load_state_dict(native.state_dict())
        made[name] = fused
    return {name: m.cuda().bfloat16() for name, m in made.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="examples per batch")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per example")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    for name in ("batch", "seq"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not torch.cuda.is_available():
        print(
            "benchmarks/norm.py: no CUDA GPU here; the Triton kernels are benchmarked on a GPU only. Nothing measured."
        )
        return 0

    import triton

    tokens = args.batch * args.seq
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"bf16 | batch {args.batch} x {args.seq} tokens"
    )
    header = [
        "norm",
        "H",
        "variant",
        "pass",
        "ms",
        "GB/s",
        "speed vs torch",
        "speed vs torch+per-example",
        "peak MiB",
        "dx err",
        "dw err",
        "sq norm err",
    ]
    rows, failures = [], []
    for kind in ("layer", "rms"):
        for width in args.widths:
            modules = variants(kind, width)
            gen = torch.Generator(device="cuda").manual_seed(0)
            x = (2 * torch.randn(args.batch, args.seq, width, device="cuda", generator=gen) + 0.5).bfloat16()
            dy = torch.randn(args.batch, args.seq, width, device="cuda", generator=gen).bfloat16()
            native = modules["torch"]
            bias: torch.Tensor | None = getattr(native, "bias", None)
            exact = reference(kind, x, native.get_parameter("weight").detach(), bias, dy)
            errs = {
                name: errors(m, x, dy, exact, m if name in ("torch + per-example", "fused") else None)
                for name, m in modules.items()
            }
            del exact
            results = {name: measure(m, x, dy) for name, m in modules.items()}
            traffic = {mode: n * tokens * width * 2 for mode, n in (("fwd", 2), ("bwd", 3), ("fwd+bwd", 5))}
            base, with_norms = results["torch"], results["torch + per-example"]
            for name, r in results.items():
                e = errs[name]
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    last = mode == "fwd+bwd"
                    rows.append(
                        [
                            kind,
                            str(width),
                            name,
                            mode,
                            f"{r[mode]:.3f}",
                            f"{traffic[mode] / r[mode] / 1e6:.0f}",
                            f"{base[mode] / r[mode]:.2f}",
                            f"{with_norms[mode] / r[mode]:.2f}",
                            f"{r['peak_mib']:.0f}" if last else "",
                            f"{e['dx']:.1e}" if last else "",
                            f"{e['dw']:.1e}" if last else "",
                            f"{e['sq']:.1e}" if last and "sq" in e else "",
                        ]
                    )
            fused, torch_err = errs["fused"], errs["torch"]
            if not fused["sq"] <= NORM_RTOL:
                failures.append(f"{kind} H={width}: per-example squared norms off by {fused['sq']:.1e} (> {NORM_RTOL})")
            for grad_name in ("dx", "dw"):
                if not fused[grad_name] <= 2 * torch_err[grad_name] + GRAD_FLOOR:
                    failures.append(
                        f"{kind} H={width}: {grad_name} error {fused[grad_name]:.1e} vs torch bf16 "
                        f"{torch_err[grad_name]:.1e}"
                    )
            del modules, x, dy
            torch.cuda.empty_cache()
    print_table(header, rows, args.markdown)
    if failures:
        print("\nFAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
