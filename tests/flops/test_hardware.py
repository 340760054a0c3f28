"""Dense peak FLOP/s: our table, the device-name parser, and the cases where Lightning 2.6's table is wrong."""

from __future__ import annotations

import pytest
import torch

from lightning_scaling.flops import hardware


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200", "h200-sxm"),  # Lightning 2.6 does not recognise it at all
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),  # Lightning 2.6 reads it as an L4
        ("NVIDIA L40", "l40"),  # likewise
        ("NVIDIA L4", "l4"),
        ("NVIDIA B200", "b200"),
        ("AMD Instinct MI300X", "mi300x"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_device_names(name, key):
    assert hardware.parse_device_name(name) == key


def test_dense_figures_from_the_spec():
    # docs/math.md §1: H100 SXM bf16 989.4e12; H200 SXM 989.4e12; H100 PCIe 756e12; A100 312e12 (dense, not sparse)
    assert hardware.dense_peak_flops("h100", "bf16") == 989.4e12
    assert hardware.dense_peak_flops("h200", torch.bfloat16) == 989.4e12
    assert hardware.dense_peak_flops("h100-pcie", "bf16") == 756e12
    assert hardware.dense_peak_flops("A100", "16-mixed") == 312e12
    assert hardware.dense_peak_flops("L40", "bf16") == pytest.approx(
        hardware.dense_peak_flops("l40s", "bf16") / 2, rel=0.01
    )


def test_unknown_gpu_and_dtype_are_value_errors():
    with pytest.raises(ValueError, match="gpu must be one of"):
        hardware.canonical_gpu("h300")
    with pytest.raises(ValueError, match="dtype"):
        hardware.dense_peak_flops("v100", "bf16")


def test_cpu_has_no_peak():
    assert hardware.device_peak_flops(torch.device("cpu"), torch.float32) is None


def test_cuda_device_looked_up_in_our_table_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert hardware.device_peak_flops("cuda:0", "bf16-mixed") == 989.4e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert hardware.device_peak_flops("cuda:0", "bf16-mixed") == 181.05e12
