"""Hardware profiles: the cache and tile geometry a plan is laid out for.

Sizes, bandwidths and peak FLOP/s are vendor datasheet values (dense, no
sparsity). Two kinds of figure are estimates, not datasheet values, and are
marked so below: L2 bandwidth and atomic throughput (public microbenchmarks
and rounding; no datasheet gives them). A profile is chosen by
``compress(target=...)``, ``options={"target": ...}``, the ROASTFX_TARGET
environment variable, or auto-detection.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

KiB, MiB = 1024, 1024 * 1024

_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
    "bf16": "bfloat16", "fp8": "float8_e4m3fn", "float8": "float8_e4m3fn",
}


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
    l2_gbps: float  # estimate: aggregate L2 read bandwidth (GPU) / all cores' L2 (CPU)
    peak_tflops: dict = field(default_factory=dict)  # dtype name -> dense TFLOP/s
    mma_shapes: tuple = ()  # tensor-core / vector instruction shapes (m, n, k)
    # fields added after the first release: defaults keep positional construction working
    atomic_gops: float = 0.0  # estimate: 4-byte atomic adds per second to distinct addresses, in 1e9/s
    kernel_block: tuple = (128, 128)  # (M, N) block the cost model assumes a GEMM kernel uses
    cuda_arch: int = 0  # GPU: CUDA compute capability as major*10+minor (90 = sm_90), what kernels compile for

    def alignment_elements(self, itemsize: int) -> int:
        """A cache line, in memory elements: the default alignment of tile offsets."""
        return max(1, self.cache_line_bytes // itemsize)

    def peak(self, dtype: str) -> float:
        """Dense peak TFLOP/s for a dtype name ("bfloat16", "bf16", "float32" ...); float32's if unknown."""
        key = str(dtype).removeprefix("torch.")
        key = _DTYPE_ALIASES.get(key, key)
        if key in self.peak_tflops:
            return self.peak_tflops[key]
        return self.peak_tflops["float32"]

    @property
    def cache_resident_bytes(self) -> int:
        """Bytes of compressed memory the cost model lets stay cached between kernels.

        GPU: the L2. CPU: the L2 is private per core, so the whole machine keeps
        ``units`` L2s' worth (the planner assumes a GEMM is split across all cores).
        """
        return self.l2_bytes if self.kind == "gpu" else self.l2_bytes * self.units

    def atomic_rate(self) -> float:
        """Atomic adds per second to distinct addresses (derived from L2 bandwidth if not given)."""
        if self.atomic_gops > 0:
            return self.atomic_gops * 1e9
        return self.l2_gbps * 1e9 / 16


_GPU_MMA = ((16, 8, 16), (16, 8, 8))
_HOPPER_PEAKS = {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4, "float16": 989.4, "float8_e4m3fn": 1978.9}

PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in [
        # H100 SXM5: 132 SMs at 1.98 GHz boost, 50 MB L2, 3.35 TB/s HBM3, 228 KB smem per SM (227 per block)
        HardwareProfile("h100", "gpu", "NVIDIA H100 SXM5 80GB", 128, 32, 256 * KiB, 227 * KiB, 50 * MiB, 50 * MiB,
                        132, 3350.0, 7000.0, dict(_HOPPER_PEAKS), _GPU_MMA + ((64, 256, 16),),
                        atomic_gops=700.0, kernel_block=(128, 128), cuda_arch=90),
        # H200: the same GH100 die as H100 SXM, 141 GB HBM3e at 4.8 TB/s
        HardwareProfile("h200", "gpu", "NVIDIA H200 SXM 141GB", 128, 32, 256 * KiB, 227 * KiB, 50 * MiB, 50 * MiB,
                        132, 4800.0, 7000.0, dict(_HOPPER_PEAKS), _GPU_MMA + ((64, 256, 16),),
                        atomic_gops=700.0, kernel_block=(128, 128), cuda_arch=90),
        # A100 SXM4 80GB: 108 SMs, 40 MB L2, 2039 GB/s HBM2e, 164 KB smem per SM (163 per block)
        HardwareProfile("a100", "gpu", "NVIDIA A100 SXM4 80GB", 128, 32, 192 * KiB, 163 * KiB, 40 * MiB, 40 * MiB,
                        108, 2039.0, 5000.0, {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0, "float16": 312.0},
                        _GPU_MMA, atomic_gops=450.0, kernel_block=(128, 128), cuda_arch=80),
        # L4 (AD104): 58 SMs, 48 MB L2, 300 GB/s GDDR6, 100 KB smem per SM (99 per block)
        HardwareProfile("l4", "gpu", "NVIDIA L4 24GB", 128, 32, 128 * KiB, 99 * KiB, 48 * MiB, 48 * MiB,
                        58, 300.0, 2000.0,
                        {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0, "float16": 121.0, "float8_e4m3fn": 242.0},
                        _GPU_MMA, atomic_gops=200.0, kernel_block=(64, 128), cuda_arch=89),
        # RTX 4090 (AD102): 128 SMs, 72 MB L2, 1008 GB/s GDDR6X; tensor figures with fp32 accumulate
        HardwareProfile("rtx4090", "gpu", "NVIDIA GeForce RTX 4090 24GB", 128, 32, 128 * KiB, 99 * KiB, 72 * MiB,
                        72 * MiB, 128, 1008.0, 5000.0,
                        {"float32": 82.6, "tf32": 82.6, "bfloat16": 165.2, "float16": 165.2, "float8_e4m3fn": 330.3},
                        _GPU_MMA, atomic_gops=450.0, kernel_block=(128, 128), cuda_arch=89),
        # Zen 3, 8 cores: 2x 256-bit FMA per core at ~4 GHz = 32 fp32 FLOP/cycle/core; dual-channel DDR4-3200
        HardwareProfile("cpu-avx2", "cpu", "x86-64 with AVX2/FMA (e.g. Zen 3, 8 cores)", 64, 64, 32 * KiB, 32 * KiB,
                        512 * KiB, 32 * MiB, 8, 51.2, 800.0, {"float32": 1.0, "bfloat16": 1.0}, ((1, 8, 1),),
                        atomic_gops=2.0, kernel_block=(64, 64)),
        # Sapphire Rapids, 16 cores: AVX-512 2 FMA ports (~2.5 TFLOP/s fp32), AMX bf16 peak ~1024 FLOP/cycle/core
        HardwareProfile("cpu-avx512", "cpu", "x86-64 with AVX-512 (e.g. Sapphire Rapids, 16 cores)", 64, 64,
                        48 * KiB, 48 * KiB, 2 * MiB, 30 * MiB, 16, 150.0, 1600.0,
                        {"float32": 2.5, "bfloat16": 30.0}, ((1, 16, 1), (16, 16, 32)),
                        atomic_gops=4.0, kernel_block=(64, 64)),
        # Graviton3 (Neoverse V1), 16 vCPU slice: 4x 128-bit FMA at 2.6 GHz = 32 fp32 FLOP/cycle/core, BFMMLA 2x
        HardwareProfile("cpu-neon", "cpu", "arm64 with NEON (e.g. Graviton3, 16 cores)", 64, 64, 64 * KiB, 64 * KiB,
                        1 * MiB, 32 * MiB, 16, 150.0, 1200.0, {"float32": 1.3, "bfloat16": 2.6}, ((1, 4, 1),),
                        atomic_gops=4.0, kernel_block=(64, 64)),
    ]
}

_ALIASES = {"cpu-arm64": "cpu-neon", "cpu-x86": "cpu-avx2", "4090": "rtx4090", "h100-sxm": "h100"}


def detect() -> HardwareProfile:
    """The profile of the machine this process runs on (CUDA device 0 if present)."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        words = props.name.lower().replace("-", " ").split()
        for key in ("h200", "h100", "a100", "l4", "4090"):
            if key in words or any(w.startswith(key) and key != "l4" for w in words):
                return PROFILES["rtx4090" if key == "4090" else key]
        # an unlisted GPU: the listed one of the same generation
        major = getattr(props, "major", 9)
        return PROFILES["h100" if major >= 9 else "a100" if major == 8 else "l4"]
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
    from_env = target is None
    if target is None:
        target = os.environ.get("ROASTFX_TARGET") or None
        if target is None:
            return detect()
    if not isinstance(target, str):
        raise TypeError(f"target must be a profile name or HardwareProfile, got {type(target).__name__}")
    key = target.strip().lower()
    key = _ALIASES.get(key, key)
    if key == "auto":
        return detect()
    if key not in PROFILES:
        source = " (set by the environment variable ROASTFX_TARGET)" if from_env else ""
        raise ValueError(f"unknown target {target!r}{source}; known targets: {', '.join(sorted(PROFILES))}, auto")
    return PROFILES[key]
