"""The Triton kernels compiled for an H100 (sm_90) on this machine, GPU or not: every autotune config that the
kernels may pick must compile, spill no registers and fit in the H100's shared memory; for 16-bit inputs its dots
must run on Hopper's warpgroup MMA (HGMMA), not the older HMMA path (fp32 dots are exact, on the FMA units).

Runs ``benchmarks/kernel_resources.py --quick`` in a subprocess: the compiler must run without TRITON_INTERPRET,
which conftest sets for the other kernel tests. Nothing is launched, so no GPU is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = {
    "attention fwd",
    "attention bwd preprocess",
    "attention bwd dk dv",
    "attention bwd dq",
    "swiglu fwd",
    "swiglu bwd",
    "gate/up GEMM + swiglu fwd",
    "gate/up GEMM + swiglu bwd",
}
ELEMENTWISE = {"attention bwd preprocess", "swiglu fwd", "swiglu bwd"}


@pytest.fixture(scope="module")
def compiled_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("kernel_resources") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_resources.py"), "--quick", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_was_compiled_for_both_head_dims(compiled_rows):
    assert {r["kernel"] for r in compiled_rows} == KERNELS
    assert {r["dtype"] for r in compiled_rows} == {"bfloat16", "float32"}
    attention = {(r["kernel"], r["shape"]) for r in compiled_rows if r["kernel"].startswith("attention")}
    assert {shape for _, shape in attention} == {"head_dim 64, causal", "head_dim 128, causal"}


def test_no_config_spills_or_overflows_shared_memory(compiled_rows):
    misfits = [
        (r["kernel"], r["shape"], r["config"], r["registers"], r["spill_bytes"], r["shared_bytes"])
        for r in compiled_rows
        if not r["fits"]
    ]
    assert not misfits, f"configs that cannot launch well on an H100: {misfits}"


def test_every_matmul_uses_hopper_warpgroup_mma(compiled_rows):
    slow = [
        (r["kernel"], r["shape"], r["config"])
        for r in compiled_rows
        if r["kernel"] not in ELEMENTWISE and r["dtype"] != "float32" and (r["hgmma"] == 0 or r["hmma"] > 0)
    ]
    assert not slow, f"configs whose dots are not HGMMA: {slow}"
