"""Dense peak FLOP/s of accelerators, for MFU and for the planner's wall-clock.

MFU must be measured against the *dense* tensor-core figure (docs/math.md §1; PaLM, Chowdhery et al. 2022, App. B).
Lightning's ``get_available_flops`` (2.6) lists sparse figures for the H100 NVL and H200, does not parse
"NVIDIA H200" at all, reads "NVIDIA L40S" as an L4 and has no B200 or MI300X. We look devices up here
first and fall back to Lightning only for devices this table does not name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a device is asked about
    import torch

# Dense (no 2:4 sparsity) tensor-core peak, FLOP/s per device, from the vendors' datasheets.
# key: canonical name -> {dtype name: FLOP/s}
DENSE_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100-sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp8": 1978.9e12},
    "h100-pcie": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12, "fp8": 1513e12},
    "h100-nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12, "fp8": 1670.5e12},
    "h200-sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp8": 1978.9e12},
    "h200-nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12, "fp8": 1670.5e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "l40s": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12, "fp8": 733e12},
    "l40": {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12, "fp8": 362e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12, "fp8": 242e12},
    "b200": {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 80e12, "fp8": 4500e12},
    "mi300x": {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12, "fp8": 2614.9e12},
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
}

# Names a user may type on the command line -> canonical key.
GPU_ALIASES: dict[str, str] = {
    "h100": "h100-sxm",
    "h100-sxm": "h100-sxm",
    "h100-pcie": "h100-pcie",
    "h100-nvl": "h100-nvl",
    "h200": "h200-sxm",
    "h200-sxm": "h200-sxm",
    "h200-nvl": "h200-nvl",
    "a100": "a100",
    "l40s": "l40s",
    "l40": "l40",
    "l4": "l4",
    "b200": "b200",
    "mi300x": "mi300x",
    "v100": "v100",
}


@dataclass(frozen=True)
class PeakFlops:
    """A device's dense peak in FLOP/s, with the table entry it came from."""

    device: str
    dtype: str
    flops_per_sec: float


def canonical_gpu(name: str, argument: str = "gpu") -> str:
    """Map a user-typed GPU name (``H100``, ``h100-pcie``, ``MI300X``) to its table key.

    Raises ``ValueError`` naming ``argument`` and the allowed names when it is unknown.
    """
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key not in GPU_ALIASES:
        raise ValueError(f"{argument} must be one of {', '.join(sorted(GPU_ALIASES))}, got {name!r}")
    return GPU_ALIASES[key]


def parse_device_name(device_name: str) -> str | None:
    """Map a driver's device name (``torch.cuda.get_device_name``) to a table key, or None when unknown."""
    n = device_name.lower()
    if "h200" in n:
        return "h200-nvl" if "nvl" in n else "h200-sxm"
    if "h100" in n:
        if "nvl" in n:
            return "h100-nvl"
        if "pcie" in n or "hbm2e" in n:
            return "h100-pcie"
        return "h100-sxm"
    if "b200" in n:
        return "b200"
    if "mi300x" in n:
        return "mi300x"
    if "a100" in n:
        return "a100"
    if "l40s" in n:  # before "l4": Lightning 2.6 reads "NVIDIA L40S" (and "NVIDIA L40") as an L4
        return "l40s"
    if "l40" in n:
        return "l40"
    if "l4" in n:
        return "l4"
    if "v100" in n:
        return "v100"
    return None


def dtype_key(dtype: object) -> str:
    """Name of a compute dtype as used in the table: bf16, fp16, tf32, fp32, fp8."""
    text = str(dtype).lower().replace("torch.", "")
    if "bfloat16" in text or "bf16" in text:
        return "bf16"
    if "float16" in text or "fp16" in text or text in {"16", "16-mixed", "half"}:
        return "fp16"
    if "tf32" in text or "tfloat32" in text:
        return "tf32"
    if "float8" in text or "fp8" in text:
        return "fp8"
    return "fp32"


def dense_peak_flops(
    gpu: str, dtype: object = "bf16", *, gpu_argument: str = "gpu", dtype_argument: str = "dtype"
) -> float:
    """Dense peak FLOP/s of a named GPU (``--gpu`` names) for a compute dtype.

    Raises ``ValueError`` naming ``gpu_argument`` when the GPU is unknown, or ``dtype_argument`` when the table has
    no figure for that dtype on that GPU (the names let a caller's own flags appear in the message).
    """
    table = DENSE_PEAK_FLOPS[canonical_gpu(gpu, gpu_argument)]
    dkey = dtype_key(dtype)
    if dkey not in table:
        raise ValueError(f"{dtype_argument} for {gpu} must be one of {', '.join(table)}, got {dtype!r}")
    return table[dkey]


def device_peak_flops(device: torch.device | str | int, dtype: object) -> float | None:
    """Dense peak FLOP/s of a ``torch.device`` for a compute dtype, or None when unknown (never a guess).

    Our table first; for devices it does not name, Lightning's ``get_available_flops`` (quietly).
    """
    import torch

    device = torch.device(device)  # "cuda", 0 or a torch.device
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    key = parse_device_name(name)
    dkey = dtype_key(dtype)
    if dkey == "fp32" and torch.get_float32_matmul_precision() != "highest":
        dkey = "tf32"
    if key is not None:
        return DENSE_PEAK_FLOPS[key].get(dkey)
    try:
        import warnings

        from lightning.fabric.utilities.throughput import get_available_flops

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}.get(
                dkey, torch.float32
            )
            value = get_available_flops(device, torch_dtype)
        return float(value) if value else None
    except Exception:  # noqa: BLE001 - an unknown device means no MFU, not a crash
        return None
