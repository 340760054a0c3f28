"""Benchmark: our fused attention (Triton) against torch SDPA with the flash backend, bf16, on a CUDA GPU.

For each head dim (64, 128) and sequence length (1k-16k) at a fixed 16k tokens per batch and d_model 2048
(batch = 16384 / seq, heads = 2048 / head_dim): median time (``triton.testing.do_bench``) of forward, backward
and forward+backward, TFLOP/s and peak memory of one forward+backward. Prints one table, both side by side.

FLOPs (model FLOPs, lightning_scaling.flops.attention_flops): forward 4·B·H·S²·D, halved when causal
("half" convention); backward 2 × forward; forward+backward 3 × forward. (FlashAttention's own benchmarks count
the backward as 2.5 × forward, so their TFLOP/s for backward read 1.25 × ours for the same time.)

Run: ``python benchmarks/attention.py`` (add ``--full`` for non-causal, ``--markdown`` for a table to paste into
benchmarks/RESULTS.md). Without a CUDA GPU it prints why and exits 0. Target on H100 bf16: forward+backward at
least 1.0 x the speed of SDPA flash.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _table import print_table  # benchmarks/ is on sys.path when run as a script


def _bench(fn, grad_to_none) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(impl, batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> dict[str, float]:
    """Median ms of forward, backward, forward+backward and peak MiB of forward+backward for one implementation."""
    q, k, v = (
        torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    grad_out = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    inputs = [q, k, v]

    def forward():
        return impl(q, k, v, causal)

    def forward_backward():
        forward().backward(grad_out)

    graph = forward()  # one forward whose backward is timed again and again
    result = {
        "fwd": _bench(forward, None),
        "bwd": _bench(lambda: graph.backward(grad_out, retain_graph=True), inputs),
        "fwd+bwd": _bench(forward_backward, inputs),
    }
    graph = None
    for t in inputs:
        t.grad = None
    result["peak_mib"] = _peak_mib(forward_backward)
    return result


def ours(q, k, v, causal):
    from lightning_scaling.kernels.ops.attention import flash_attention

    return flash_attention(q, k, v, causal=causal)


def sdpa_flash(q, k, v, causal):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="non-causal attention (default: causal)")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--tokens", type=int, default=16384, help="batch × seq per step (default 16384)")
    parser.add_argument("--d-model", type=int, default=2048, help="heads × head_dim (default 2048)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/attention.py: no CUDA GPU here; the Triton kernels are benchmarked on a GPU only. "
            "Nothing measured."
        )
        return 0

    import triton

    from lightning_scaling.flops.formulas import attention_flops

    causal = not args.full
    print(
        f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
        f"bf16 | {'causal' if causal else 'full'} | {args.tokens} tokens, d_model {args.d_model}"
    )
    header = [
        "head_dim",
        "seq",
        "batch",
        "heads",
        "pass",
        "ours ms",
        "sdpa ms",
        "ours TFLOP/s",
        "sdpa TFLOP/s",
        "speed ours/sdpa",
        "ours peak MiB",
        "sdpa peak MiB",
    ]
    rows = []
    for head_dim in args.head_dims:
        for seq in args.seqs:
            batch, heads = max(1, args.tokens // seq), args.d_model // head_dim
            forward_flops = attention_flops(batch, heads, seq, seq, head_dim, causal, "half")
            flops = {"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops}
            a = measure(ours, batch, heads, seq, head_dim, causal)
            b = measure(sdpa_flash, batch, heads, seq, head_dim, causal)
            for mode in ("fwd", "bwd", "fwd+bwd"):
                peak = (f"{a['peak_mib']:.0f}", f"{b['peak_mib']:.0f}") if mode == "fwd+bwd" else ("", "")
                rows.append(
                    [
                        str(head_dim),
                        str(seq),
                        str(batch),
                        str(heads),
                        mode,
                        f"{a[mode]:.3f}",
                        f"{b[mode]:.3f}",
                        f"{flops[mode] / a[mode] / 1e9:.1f}",
                        f"{flops[mode] / b[mode] / 1e9:.1f}",
                        f"{b[mode] / a[mode]:.2f}",
                        *peak,
                    ]
                )
            torch.cuda.empty_cache()
    print_table(header, rows, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
