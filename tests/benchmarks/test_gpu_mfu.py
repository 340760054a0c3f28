"""benchmarks/gpu_mfu.py without a GPU: the MFU and sync-count plumbing on the CPU, argument checks, and the
refusal without CUDA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


TINY = {"n_layer": 1, "d_model": 32, "n_head": 2, "d_ff": 64, "seq_len": 16, "batch_size": 4, "accumulate": 2}


@pytest.mark.slow
def test_mfu_plumbing_on_cpu_matches_the_hand_computation(mfu):
    """On the CPU (host clock, fp32, a given peak) the callback's MFU and the hand computation must agree: the
    same FLOPs and, over the same window, nearly the same time."""
    shape = mfu.RunShape(**TINY)
    result = mfu.measure_mfu(
        False, shape=shape, steps=24, warmup=2, corpus_bytes=100_000, device="cpu", peak_flops=1e11
    )
    assert result["steps"] == 24 and result["steps_compared"] == 1
    assert result["analytic_flops_per_step_palm"] == pytest.approx(mfu.analytic_flops_per_step(shape, "palm"))
    assert result["flops_ratio_callback_over_analytic"] == pytest.approx(1.0, rel=0.05)
    assert result["mfu_ratio_callback_over_hand"] == pytest.approx(1.0, rel=0.15)
    assert 0 < result["hand_mfu_window"] < 1 and result["final_loss"] > 0


@pytest.mark.slow
def test_sync_count_plumbing_on_cpu(mfu):
    shape = mfu.RunShape(**TINY)
    result = mfu.count_host_syncs(True, shape=shape, steps=8, warmup=3, device="cpu")
    assert result["steps_counted"] == 5 and result["monitor"] is True
    assert result["sync_warnings_per_step_mean"] == 0  # nothing synchronises on the CPU
    assert result["profiler_error"] is None


def test_mfu_arguments_are_checked(mfu):
    with pytest.raises(ValueError, match="warmup"):
        mfu.measure_mfu(False, steps=10, warmup=10, device="cpu")
    with pytest.raises(ValueError, match="device"):
        mfu.measure_mfu(False, device="tpu")
    with pytest.raises(ValueError, match="d_model"):
        mfu.RunShape(n_layer=1, d_model=30, n_head=4, d_ff=64, seq_len=16, batch_size=1, accumulate=1)
    with pytest.raises(ValueError, match="batch_size"):
        mfu.RunShape(n_layer=1, d_model=32, n_head=4, d_ff=64, seq_len=16, batch_size=0, accumulate=1)


@pytest.mark.slow
def test_gpu_mfu_without_cuda_exits_2():
    if torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without CUDA")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "mfu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "GPU" in done.stderr
