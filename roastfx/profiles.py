"""Hardware profiles: the cache and tile geometry a plan is laid out for.

Figures are vendor datasheet values (dense, no sparsity). A profile is chosen by
``compress(target=...)``, ``options={"target": ...}``, the ROASTFX_TARGET
environment variable, or auto-detection.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    kind: str  # "gpu" | "cpu"
    description: str
    cache_line_bytes: int  # unit of a memory transaction (GPU: L2 line, CPU: cache line)
    sector_bytes: int  # smallest unit actually moved (GPU: 32 B sector)
    l1_bytes: int  # L1 / shared memory per SM (GPU) or L1d per core (CPU)
    smem_per_block_bytes: int  # most shared memory one thread block may use (CPU: L1d)
    l2_bytes: int  # last level the plan can keep resident (GPU: L2, CPU: L2 per core)
    llc_bytes: int  # last-level cache (GPU: L2, CPU: L3)
    units: int  # SMs (GPU) or cores (CPU)
    dram_gbps: float
    l2_gbps: float
    peak_tflops: dict = field(default_factory=dict)  # dtype name -> dense TFLOP/s
    mma_shapes: tuple = ()  # tensor-core / vector instruction shapes (m, n, k)

    def alignment_elements(self, itemsize: int) -> int:
        """A cache line, in memory elements: the default alignment of tile offsets."""
        return max(1, self.cache_line_bytes // itemsize)

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_tflops:
            return self.peak_tflops[dtype]
        return self.peak_tflops["float32"]


_GPU_MMA = ((16, 8, 16), (16, 8, 8))

PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in [
        HardwareProfile("h100", "gpu", "NVIDIA H100 SXM5 80GB", 128, 32, 228 * KiB, 227 * KiB, 50 * MiB, 50 * MiB,
                        132, 3350.0, 12000.0, {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
                        _GPU_MMA + ((64, 256, 16),)),
        HardwareProfile("h200", "gpu", "NVIDIA H200 SXM 141GB", 128, 32, 228 * KiB, 227 * KiB, 50 * MiB, 50 * MiB,
                        132, 4800.0, 12000.0, {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4},
                        _GPU_MMA + ((64, 256, 16),)),
        HardwareProfile("a100", "gpu", "NVIDIA A100 SXM4 80GB", 128, 32, 192 * KiB, 163 * KiB, 40 * MiB, 40 * MiB,
                        108, 2039.0, 5500.0, {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
                        _GPU_MMA),
        HardwareProfile("l4", "gpu", "NVIDIA L4 24GB", 128, 32, 128 * KiB, 99 * KiB, 48 * MiB, 48 * MiB,
                        58, 300.0, 2000.0, {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0},
                        _GPU_MMA),
        HardwareProfile("rtx4090", "gpu", "NVIDIA GeForce RTX 4090 24GB", 128, 32, 128 * KiB, 99 * KiB, 72 * MiB,
                        72 * MiB, 128, 1008.0, 5000.0,
                        {"float32": 82.6, "tf32": 82.6, "bfloat16": 165.2, "float16": 165.2}, _GPU_MMA),
        HardwareProfile("cpu-avx2", "cpu", "x86-64 with AVX2/FMA (e.g. Zen 3, 8 cores)", 64, 64, 32 * KiB, 32 * KiB,
                        512 * KiB, 32 * MiB, 8, 50.0, 400.0, {"float32": 1.0, "bfloat16": 1.0}, ((1, 8, 1),)),
        HardwareProfile("cpu-avx512", "cpu", "x86-64 with AVX-512 (e.g. Sapphire Rapids, 16 cores)", 64, 64,
                        48 * KiB, 48 * KiB, 2 * MiB, 60 * MiB, 16, 150.0, 1600.0,
                        {"float32": 3.0, "bfloat16": 12.0}, ((1, 16, 1), (16, 16, 32))),
        HardwareProfile("cpu-neon", "cpu", "arm64 with NEON (e.g. Graviton3, 16 cores)", 64, 64, 64 * KiB, 64 * KiB,
                        1 * MiB, 32 * MiB, 16, 150.0, 1200.0, {"float32": 1.0, "bfloat16": 2.0}, ((1, 4, 1),)),
    ]
}

_ALIASES = {"cpu-arm64": "cpu-neon", "cpu-x86": "cpu-avx2"}


def detect() -> HardwareProfile:
    """The profile of the machine this process runs on (CUDA device 0 if present)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_properties(0).name.lower()
        for key in ("h200", "h100", "a100", "l4", "4090"):
            if key in name:
                return PROFILES["rtx4090" if key == "4090" else key]
        return PROFILES["h100"]
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return PROFILES["cpu-neon"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        if " avx512f" in flags:
            return PROFILES["cpu-avx512"]
    except OSError:
        pass
    return PROFILES["cpu-avx2"]


def get_profile(target: str | HardwareProfile | None = None) -> HardwareProfile:
    """Resolve a target: a profile, a name, None (ROASTFX_TARGET, else auto-detect)."""
    if isinstance(target, HardwareProfile):
        return target
    if target is None:
        target = os.environ.get("ROASTFX_TARGET") or None
        if target is None:
            return detect()
    if not isinstance(target, str):
        raise TypeError(f"target must be a profile name or HardwareProfile, got {type(target).__name__}")
    key = _ALIASES.get(target.lower(), target.lower())
    if key == "auto":
        return detect()
    if key not in PROFILES:
        raise ValueError(f"unknown target {target!r}; known targets: {', '.join(sorted(PROFILES))}, auto")
    return PROFILES[key]
