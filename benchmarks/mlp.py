"""Benchmark: the SwiGLU MLP with our fused gate (``FusedSwiGLU``) against the eager one (``examples/gpt.py``
``SwiGLU``), same weights, bf16, on a CUDA GPU.

For tokens = 16384 and d_model in (1024, 2048, 4096) with d_ff = 8/3 · d_model rounded up to 256: median time
(``triton.testing.do_bench``) of forward, backward and forward+backward, TFLOP/s, the activation memory the
forward leaves for the backward (bytes allocated after the forward, minus the output) and the peak memory of
forward+backward. Prints one table, both side by side.

FLOPs (model FLOPs; SPEC.md §1, Hoffmann 2022 App. F, gated dense block 2·S·3·d·f): forward 3 GEMMs of
2·tokens·d_model·d_ff; backward 2 × forward; forward+backward 3 × forward. The fused gate adds no matmul.

Run: ``python benchmarks/mlp.py`` (``--markdown`` for a table to paste into benchmarks/RESULTS.md). Without a
CUDA GPU it prints why and exits 0. Target on H100 bf16: forward+backward at least 1.1 x eager speed at no more
than 0.70 x the activation memory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _bench(fn, grad_to_none) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def measure(mlp: torch.nn.Module, tokens: int, d_model: int) -> dict[str, float]:
    x = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16)
    params = [x, *mlp.parameters()]

    def forward_backward():
        mlp(x).backward(grad_out)

    out = mlp(x)
    result = {
        "fwd": _bench(lambda: mlp(x), None),
        "bwd": _bench(lambda: out.backward(grad_out, retain_graph=True), params),
        "fwd+bwd": _bench(forward_backward, params),
    }
    del out
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = mlp(x)
    torch.cuda.synchronize()
    result["act_mib"] = (torch.cuda.memory_allocated() - before - out.numel() * out.element_size()) / 2**20
    del out
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-models", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/mlp.py: no CUDA GPU here; the Triton kernels are benchmarked on a GPU only. "
              "Nothing measured.")
        return 0

    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from gpt import GPTConfig, SwiGLU

    from lightning_scaling.kernels.modules import FusedSwiGLU

    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bf16 | {args.tokens} tokens")
    header = ["d_model", "d_ff", "pass", "fused ms", "eager ms", "fused TFLOP/s", "eager TFLOP/s",
              "speed fused/eager", "fused act MiB", "eager act MiB", "act mem fused/eager", "fused peak MiB",
              "eager peak MiB"]
    rows = []
    for d_model in args.d_models:
        d_ff = -(-8 * d_model // 3 // 256) * 256
        torch.manual_seed(0)
        eager = SwiGLU(GPTConfig(d_model=d_model, d_ff=d_ff)).cuda().bfloat16()
        fused = FusedSwiGLU(d_model, d_ff).cuda().bfloat16()
        fused.load_state_dict(eager.state_dict())
        forward_flops = 3 * 2 * args.tokens * d_model * d_ff  # gate, up, down GEMMs (Hoffmann 2022 App. F)
        flops = {"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops}
        a, b = measure(fused, args.tokens, d_model), measure(eager, args.tokens, d_model)
        for mode in ("fwd", "bwd", "fwd+bwd"):
            mem = ((f"{a['act_mib']:.0f}", f"{b['act_mib']:.0f}", f"{a['act_mib'] / b['act_mib']:.2f}",
                    f"{a['peak_mib']:.0f}", f"{b['peak_mib']:.0f}") if mode == "fwd+bwd" else ("",) * 5)
            rows.append([str(d_model), str(d_ff), mode, f"{a[mode]:.3f}", f"{b[mode]:.3f}",
                         f"{flops[mode] / a[mode] / 1e9:.1f}", f"{flops[mode] / b[mode] / 1e9:.1f}",
                         f"{b[mode] / a[mode]:.2f}", *mem])
        del eager, fused
        torch.cuda.empty_cache()
    _print_table(header, rows, args.markdown)
    return 0


def _print_table(header: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
