"""Compile every Triton kernel and autotune config for an H100 (sm_90) on any machine, GPU or not, and report
what the compiler says: registers per thread, spilled bytes, shared memory per program, and whether the dots
became Hopper's warpgroup MMA (``HGMMA`` in the SASS) or stayed on the older ``HMMA`` path.

Nothing runs: the kernels go through their real launchers (so the JIT specialises on the same alignments,
strides and constants as in training), with Triton's driver swapped for a stub that names an sm_90 target and a
launch that only compiles. The PTX is assembled by the ``ptxas`` that ships with Triton and read back with its
``cuobjdump``. This says whether each config can launch on an H100 and how it was compiled; how fast it runs
needs the GPU (``benchmarks/attention.py``, ``benchmarks/mlp.py``).

Run: ``python benchmarks/kernel_resources.py`` (``--quick``: bf16, fp32 and causal only, the configs being the
same for fp16 and full attention; ``--markdown`` for benchmarks/RESULTS.md; ``--json PATH`` for tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter replaces the compiler; it must be off before import

import torch
import triton
from _table import print_table
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # 227 KiB: the most dynamic shared memory one program may opt into on sm_90
MAX_REGISTERS = 255
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target; no device, so nothing can launch."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(kernels: dict[str, Any], target: GPUTarget = H100) -> Iterator[list[tuple[str, dict, Any]]]:
    """Inside the block, launching one of ``kernels`` compiles it for ``target`` (every autotune config) and
    records ``(name, config, compiled kernel)`` instead of running it."""
    records: list[tuple[str, dict, Any]] = []

    def autotuned(name: str, kernel: Autotuner):
        def run(*args: Any, grid: Any, warmup: bool = False, **kwargs: Any) -> None:
            # as Triton's Autotuner.run: trailing arguments may come by keyword, so args can be the shorter
            kernel.nargs = dict(zip(kernel.arg_names, args, strict=False))
            configs = kernel.prune_configs(kwargs)  # the configs warmup compiles, in its order
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            for config, binary in zip(configs, compiled, strict=True):
                records.append(
                    (name, {**config.kwargs, "warps": config.num_warps, "stages": config.num_stages}, binary)
                )

        return run

    def plain(name: str, kernel: Any):
        def run(*args: Any, grid: Any, warmup: bool = False, **kwargs: Any) -> None:
            binary = type(kernel).run(kernel, *args, grid=grid, warmup=True, **kwargs)
            records.append((name, {"warps": binary.metadata.num_warps, "stages": binary.metadata.num_stages}, binary))

        return run

    previous = driver._active
    driver.set_active(_CompileOnlyDriver(target))
    for name, kernel in kernels.items():
        kernel.run = autotuned(name, kernel) if isinstance(kernel, Autotuner) else plain(name, kernel)
    try:
        yield records
    finally:
        for kernel in kernels.values():
            del kernel.run
        driver._active = previous


def resources(binary: Any) -> dict[str, int]:
    """Registers per thread, spilled bytes (local memory and stack), shared bytes and MMA instruction counts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(binary.asm["cubin"])
        usage = subprocess.run(
            [str(_BIN / "cuobjdump"), "--dump-resource-usage", str(path)], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [str(_BIN / "cuobjdump"), "--dump-sass", str(path)], check=True, capture_output=True, text=True
        ).stdout
    fields = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return {
        "registers": fields["REG"],
        "spill_bytes": fields["LOCAL"] + fields["STACK"],
        "shared_bytes": fields["SHARED"] + int(binary.metadata.shared),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
    }


# ----------------------------------------------------------------------------------------------------------
# The cases: each calls a real launcher on CPU tensors of training shapes (only shapes and strides matter).
# ----------------------------------------------------------------------------------------------------------
def attention_cases(dtypes: list[torch.dtype], head_dims: list[int], causals: list[bool]) -> list[dict]:
    from lightning_scaling.kernels.ops import attention as ops

    kernels = {
        "attention fwd": ops._attn_fwd_kernel,
        "attention bwd preprocess": ops._attn_bwd_preprocess_kernel,
        "attention bwd dk dv": ops._attn_bwd_dkdv_kernel,
        "attention bwd dq": ops._attn_bwd_dq_kernel,
    }
    rows = []
    batch, seq, heads = 2, 4096, 16
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in causals:
                # q, k, v as FusedSelfAttention makes them: strided views of one [B, S, 3, H, D] projection.
                qkv = torch.empty(batch, seq, 3, heads, head_dim, dtype=dtype)
                q, k, v = qkv.permute(2, 0, 3, 1, 4)
                out = torch.empty(batch, heads, seq, head_dim, dtype=dtype)
                lse = torch.empty(batch, heads, seq, dtype=torch.float32)
                with compile_only(kernels) as records:
                    ops._triton_forward(q, k, v, causal, head_dim**-0.5)
                    ops._triton_backward(out, q, k, v, out, lse, causal, head_dim**-0.5)
                shape = f"head_dim {head_dim}, {'causal' if causal else 'full'}"
                rows += [_row(name, dtype, shape, config, binary) for name, config, binary in records]
    return rows


def swiglu_cases(dtypes: list[torch.dtype]) -> list[dict]:
    from lightning_scaling.kernels.ops import swiglu as elementwise
    from lightning_scaling.kernels.ops import swiglu_gemm as gemm

    kernels = {
        "swiglu fwd": elementwise._swiglu_fwd_kernel,
        "swiglu bwd": elementwise._swiglu_bwd_kernel,
        "gate/up GEMM + swiglu fwd": gemm._gate_up_swiglu_fwd_kernel,
        "gate/up GEMM + swiglu bwd": gemm._gate_up_swiglu_bwd_kernel,
    }
    rows = []
    tokens, d_model, d_ff = 16384, 2048, 5632
    for dtype in dtypes:
        x = torch.empty(tokens, d_model, dtype=dtype)
        w = torch.empty(d_ff, d_model, dtype=dtype)
        h = torch.empty(tokens, d_ff, dtype=dtype)
        with compile_only(kernels) as records:
            elementwise._triton_forward(h, h)
            elementwise._triton_backward(h, h, h)
            elementwise._triton_backward(h, h, h, with_product=True)  # the MLP op's backward
            gemm._triton_forward(x, w, w)
            gemm._triton_gate_up_grads(h, x, w, w)
        shape = f"{tokens}x{d_model}x{d_ff}"
        rows += [_row(name, dtype, shape, config, binary) for name, config, binary in records]
    return rows


def _row(name: str, dtype: torch.dtype, shape: str, config: dict, binary: Any) -> dict:
    used = resources(binary)
    fits = used["spill_bytes"] == 0 and used["shared_bytes"] <= H100_SHARED_BYTES and used["registers"] <= MAX_REGISTERS
    return {
        "kernel": name,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "config": config,
        **used,
        "fits": fits,
    }


def _config_text(config: dict) -> str:
    blocks = "x".join(str(config[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_SIZE") if k in config)
    return f"{blocks + ', ' if blocks else ''}{config['warps']} warps, {config['stages']} stages"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bf16, fp32 and causal only")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    if not (_BIN / "cuobjdump").exists():
        print(f"kernel_resources.py: Triton's NVIDIA tools are not at {_BIN}; nothing compiled.")
        return 1
    dtypes = [torch.bfloat16, torch.float32] if args.quick else [torch.bfloat16, torch.float16, torch.float32]
    rows = attention_cases(dtypes, [64, 128], [True] if args.quick else [True, False])
    rows += swiglu_cases(dtypes)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(
        f"compiled for {H100.backend} sm_{H100.arch} (H100) on this machine, not run | torch {torch.__version__} "
        f"| triton {triton.__version__}"
    )
    header = [
        "kernel",
        "dtype",
        "shape",
        "config",
        "registers",
        "spilled bytes",
        "shared KiB",
        "HGMMA",
        "HMMA",
        "fits H100",
    ]
    table = [
        [
            r["kernel"],
            r["dtype"],
            r["shape"],
            _config_text(r["config"]),
            str(r["registers"]),
            str(r["spill_bytes"]),
            f"{r['shared_bytes'] / 1024:.0f}",
            str(r["hgmma"]),
            str(r["hmma"]),
            "yes" if r["fits"] else "NO",
        ]
        for r in rows
    ]
    print_table(header, table, args.markdown, align_right=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
