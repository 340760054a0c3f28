"""Benchmark: the SwiGLU MLP with our two fusions (``FusedSwiGLU(fusion="elementwise")``, cuBLAS GEMMs with the
fused gate, keeping 2 of eager's 4 [tokens, d_ff] tensors; ``FusedSwiGLU(fusion="gemm")``, the gate/up GEMM with
the SwiGLU epilogue, keeping 1) against the eager one (``examples/gpt.py`` ``SwiGLU``), same weights, bf16, on a
CUDA GPU.

For tokens = 16384 and d_model in (1024, 2048, 4096) with d_ff = 8/3 · d_model rounded up to 256: median time
(``triton.testing.do_bench``) of forward, backward and forward+backward, TFLOP/s, the activation memory the
forward leaves for the backward (bytes allocated after the forward, minus the output) and the peak memory of
forward+backward. Prints one table, both side by side.

FLOPs (model FLOPs; docs/math.md §1, Hoffmann 2022 App. F, gated dense block 2·S·3·d·f): forward 3 GEMMs of
2·tokens·d_model·d_ff; backward 2 × forward; forward+backward 3 × forward, for every variant. The "gemm" fusion's
backward recomputes the gate/up GEMMs (4·tokens·d_model·d_ff hardware FLOPs more), which its TFLOP/s does not
credit: the column compares useful work per second.

Run: ``python benchmarks/mlp.py`` (``--markdown`` for a table to paste into benchmarks/RESULTS.md). Without a
CUDA GPU it prints why and exits 0. Target on H100 bf16: forward+backward at least 1.1 x eager speed at no more
than 0.70 x the activation memory.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _table import print_table  # benchmarks/ is on sys.path when run as a script


def _bench(fn, grad_to_none) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def measure(mlp: torch.nn.Module, tokens: int, d_model: int) -> dict[str, float]:
    x = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(tokens, d_model, device="cuda", dtype=torch.bfloat16)
    params = [x, *mlp.parameters()]

    def forward_backward():
        mlp(x).backward(grad_out)

    graph = mlp(x)  # one forward whose backward is timed again and again
    result = {
        "fwd": _bench(lambda: mlp(x), None),
        "bwd": _bench(lambda: graph.backward(grad_out, retain_graph=True), params),
        "fwd+bwd": _bench(forward_backward, params),
    }
    graph = None
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
        print(
            "benchmarks/mlp.py: no CUDA GPU here; the Triton kernels are benchmarked on a GPU only. Nothing measured."
        )
        return 0

    import triton
    from _example import example_gpt

    GPTConfig, SwiGLU = example_gpt().GPTConfig, example_gpt().SwiGLU

    from lightning_scaling.kernels.modules import FusedSwiGLU

    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"bf16 | {args.tokens} tokens"
    )
    header = [
        "d_model",
        "d_ff",
        "variant",
        "pass",
        "ms",
        "TFLOP/s",
        "speed vs eager",
        "act MiB",
        "act mem vs eager",
        "peak MiB",
    ]
    rows = []
    for d_model in args.d_models:
        d_ff = -(-8 * d_model // 3 // 256) * 256
        torch.manual_seed(0)
        eager = SwiGLU(GPTConfig(d_model=d_model, d_ff=d_ff)).cuda().bfloat16()
        variants = {"eager": eager}
        for fusion in ("elementwise", "gemm"):
            variants[f"fused {fusion}"] = FusedSwiGLU(d_model, d_ff, fusion=fusion).cuda().bfloat16()
            variants[f"fused {fusion}"].load_state_dict(eager.state_dict())
        forward_flops = 3 * 2 * args.tokens * d_model * d_ff  # gate, up, down GEMMs (Hoffmann 2022 App. F)
        flops = {"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops}
        results = {name: measure(mlp, args.tokens, d_model) for name, mlp in variants.items()}
        base = results["eager"]
        for name, r in results.items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                mem = (
                    (f"{r['act_mib']:.0f}", f"{r['act_mib'] / base['act_mib']:.2f}", f"{r['peak_mib']:.0f}")
                    if mode == "fwd+bwd"
                    else ("",) * 3
                )
                rows.append(
                    [
                        str(d_model),
                        str(d_ff),
                        name,
                        mode,
                        f"{r[mode]:.3f}",
                        f"{flops[mode] / r[mode] / 1e9:.1f}",
                        f"{base[mode] / r[mode]:.2f}",
                        *mem,
                    ]
                )
        del eager, variants
        torch.cuda.empty_cache()
    print_table(header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
