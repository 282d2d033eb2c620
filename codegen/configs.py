"""Block sizes for the ROAST kernels.

The mapping never depends on a kernel's blocks (each element is hashed on its
own), so any candidate here is safe to pick, autotune or change between runs: only
speed and the summation order of floating-point reductions change.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

MIN_BLOCK = 32  # tl.dot needs >= 16; the interpreter needs big blocks to be fast


@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    min_arch: int = 0  # the lowest CUDA compute capability (major * 10 + minor) it is offered on; 0: any

    def shared_memory(self, element_size: int, b_element_size: int | None = None) -> int:
        """Bytes of shared memory the pipelined A and B tiles take (B in ``b_element_size`` bytes, default
        ``element_size``: a ROAST B tile is read from the memory in the memory's dtype), plus, when the
        dtypes differ, the B tile converted to the dot's dtype.

        An upper bound on what the compiled kernels ask for, per `benchmarks/compile_check.py`
        (ptxas, every kernel and config): exact for the dMemory kernel on sm_90; Triton's pipeliner
        keeps one stage fewer on sm_80/sm_89, and one B stage fewer for the forward kernel on sm_90.
        A launch the device still refuses for resources falls back to the next config
        (:func:`run_fitting`)."""
        b = element_size if b_element_size is None else b_element_size
        pipelined = self.num_stages * (self.block_m * self.block_k * element_size + self.block_k * self.block_n * b)
        return pipelined + (self.block_k * self.block_n * element_size if b != element_size else 0)


CANDIDATES: tuple[BlockConfig, ...] = (
    # sm_90 only: two warpgroups share each B tile that the main loop signs in registers, twice the MMA work per
    # iteration for the same register pass over B (benchmarks/compile_check.py: 1,024 HGMMA cycles against
    # about 900 issue cycles at 256x128x64, 512 against 830 at 128x128x64; no spills); on sm_80 and sm_89 their
    # mma.sync accumulators spill 80-112 bytes
    BlockConfig(256, 128, 64, num_warps=8, num_stages=3, min_arch=90),
    BlockConfig(256, 128, 32, num_warps=8, num_stages=4, min_arch=90),
    BlockConfig(128, 128, 64, num_warps=8, num_stages=3),
    BlockConfig(128, 128, 32, num_warps=8, num_stages=4),
    BlockConfig(128, 64, 64, num_warps=4, num_stages=4),
    BlockConfig(64, 128, 64, num_warps=4, num_stages=4),
    BlockConfig(64, 64, 64, num_warps=4, num_stages=3),
    BlockConfig(64, 64, 32, num_warps=4, num_stages=4),
    BlockConfig(32, 64, 64, num_warps=4, num_stages=4),
    BlockConfig(32, 128, 64, num_warps=4, num_stages=4),
    BlockConfig(32, 32, 32, num_warps=2, num_stages=2),
)

# A float32 dot at "highest" precision (no TF32) runs on FMA units, and Triton keeps its operand tiles in
# registers: with block_k >= 32 every such kernel spills (benchmarks/compile_check.py, 2-6 KB of stack per
# thread). These keep block_k at 16 and, of the 16-deep blocks tried, are the ones that spill nothing in any
# kernel (linear with either epilogue, dMemory, conv with a batch-norm epilogue) on sm_80, sm_89 and sm_90;
# 128x64 and 64x128 spilled up to 48 bytes there.
FMA_CANDIDATES: tuple[BlockConfig, ...] = (
    BlockConfig(64, 64, 16, num_warps=8, num_stages=3),
    BlockConfig(32, 64, 16, num_warps=4, num_stages=3),
    BlockConfig(64, 32, 16, num_warps=4, num_stages=3),
)

# The conv kernels (triton_conv.py: forward with any epilogue, dX, dMemory) compute every A element's address
# from its pixel and tap, on top of the B tile's per-element hashing, and an epilogue with a residual holds a
# second 2-D tile of 64-bit addresses: most CANDIDATES spill there (0.1 to 2.3 KB of stack per thread on
# sm_90, bf16; 128x64x32 with 8 warps, and 64x64x32 with 4, in ResNet's conv + batch norm + residual + relu;
# 8 bytes here and there at 32x64x32 with 3 stages, 32x32x32, 64x32x32).
# These spill nothing in any conv kernel, in bf16, fp16 and TF32, on sm_80, sm_89 and sm_90
# (benchmarks/compile_check.py compiles each).
CONV_CANDIDATES: tuple[BlockConfig, ...] = (
    BlockConfig(64, 64, 32, num_warps=8, num_stages=4),
    BlockConfig(32, 64, 32, num_warps=4, num_stages=4),
)
# ... and at "highest" fp32 (FMA units) the one 16-deep block that spills in no conv kernel (2-D and 3-D) on
# sm_80, sm_89 and sm_90 under Triton 3.6 and 3.7.1; every other one tried (the FMA_CANDIDATES, 32x64 with 4
# or 8 warps, 64x32, 32x32, 2 to 3 stages) spilled 8 bytes somewhere.
FMA_CONV_CANDIDATES: tuple[BlockConfig, ...] = (
    BlockConfig(64, 64, 16, num_warps=8, num_stages=2),
)

INTERPRETER_CONFIG = BlockConfig(32, 32, 32, num_warps=1, num_stages=1)


def candidates(target, element_size: int = 2, block_tile: tuple[int, int, int] | None = None,
               b_element_size: int | None = None, fma: bool = False, conv: bool = False,
               arch: int | None = None) -> list[BlockConfig]:
    """The candidates for a hardware profile: those whose pipelined tiles fit in its shared memory.

    ``target`` is a hardware profile (anything with ``smem_per_block_bytes``, e.g.
    ``roastfx.profiles.PROFILES["h100"]``, whose ``cuda_arch`` is the architecture) or a number of
    bytes (then ``arch``, the CUDA compute capability as major * 10 + minor, says which
    architecture-specific configs apply; None: none of them). ``block_tile`` is the
    plan's hash tile as seen by the kernel's (block_m, block_n, block_k) axes (0 = no
    constraint on that axis): when some fitting candidates are multiples of it, only
    those are kept, so a block never splits a hash tile; otherwise all fitting ones are
    (the mapping is hashed per element, so any block reads the same slots). ``fma``: the dot
    runs in full fp32 on FMA units (FMA_CANDIDATES); ``conv``: a conv kernel (CONV_CANDIDATES, or with
    ``fma`` FMA_CONV_CANDIDATES).
    """
    limit = getattr(target, "smem_per_block_bytes", target)
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"candidates takes a hardware profile or a number of bytes, got {target!r}")
    if limit <= 0:
        raise ValueError(f"shared_memory_limit must be a positive number of bytes, got {limit}")
    pool = ((FMA_CONV_CANDIDATES if conv else FMA_CANDIDATES) if fma else
            (CONV_CANDIDATES if conv else CANDIDATES))
    arch = getattr(target, "cuda_arch", None) if arch is None else arch
    pool = [c for c in pool if c.min_arch <= (arch or 0)]
    fitting = [c for c in pool if c.shared_memory(element_size, b_element_size) <= limit]
    if not fitting:
        smallest = min(c.shared_memory(element_size, b_element_size) for c in pool)
        raise ValueError(
            f"no block config fits in {limit} bytes of shared memory "
            f"(the smallest needs {smallest} at {element_size}-byte elements)"
        )
    if block_tile is not None:
        aligned = [c for c in fitting if _holds_whole_tiles(c, block_tile)]
        fitting = aligned or fitting
    return fitting


def _holds_whole_tiles(c: BlockConfig, block_tile: tuple[int, int, int]) -> bool:
    return all(t <= 0 or b % t == 0 for b, t in zip((c.block_m, c.block_n, c.block_k), block_tile))


def pick(m: int, n: int, k: int, shared_memory_limit, element_size: int = 2,
         block_tile: tuple[int, int, int] | None = None, b_element_size: int | None = None,
         exclude=(), fma: bool = False, conv: bool = False, arch: int | None = None) -> BlockConfig:
    """A good config without timing: the largest tile that still gives the GPU enough programs
    (``exclude``: configs the device refused; ``arch``: as in :func:`candidates`)."""
    if interpreting():
        return INTERPRETER_CONFIG
    fitting = _usable(candidates(shared_memory_limit, element_size, block_tile, b_element_size, fma, conv, arch),
                      exclude)

    def score(c: BlockConfig):
        programs = -(-m // c.block_m) * -(-n // c.block_n)
        waste = (-(-m // c.block_m) * c.block_m) * (-(-n // c.block_n) * c.block_n) / max(m * n, 1)
        return (programs >= 128, -waste, c.block_m * c.block_n, c.block_k)

    return max(fitting, key=score)


_autotune = False


def set_autotune(enabled: bool) -> None:
    """Turn kernel autotuning on or off for this process (``mode="max-autotune"`` turns it on).

    When on (or ROASTFX_AUTOTUNE=1) and a launch runs on CUDA, the plan-compatible
    candidates are timed once per (kernel, shape bucket, dtype) and the fastest is
    cached; off, or under the Triton interpreter, the heuristic in :func:`pick` is used.
    """
    global _autotune
    if not isinstance(enabled, bool):
        raise TypeError(f"set_autotune expects a bool, got {enabled!r} ({type(enabled).__name__})")
    _autotune = enabled


def autotune_enabled() -> bool:
    """Whether autotuning is on: :func:`set_autotune` (True) or the env var ROASTFX_AUTOTUNE=1."""
    return _autotune or os.environ.get("ROASTFX_AUTOTUNE") == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def shared_memory_limit(device) -> int:
    """Bytes of shared memory one program may use on ``device`` (a CUDA device)."""
    import torch

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
    if not limit:
        import triton

        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def multiprocessors(device) -> int:
    """How many SMs ``device`` (a CUDA device) has."""
    import torch

    dev = torch.device(device)
    return _multiprocessors(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def cuda_arch(device) -> int:
    """The CUDA compute capability of ``device`` as major * 10 + minor (90 for an H100)."""
    import torch

    dev = torch.device(device)
    major, minor = torch.cuda.get_device_capability(dev.index if dev.index is not None else None)
    return major * 10 + minor


_devices: dict[int, tuple[int, int]] = {}  # device index -> (shared memory per block, CUDA compute capability)
_tuned: dict[tuple, BlockConfig] = {}


def shape_bucket(*sizes: int) -> tuple[int, ...]:
    """Sizes rounded up to powers of two: shapes in one bucket share a tuned config."""
    return tuple(1 << max(0, int(s) - 1).bit_length() for s in sizes)


def tune(key: tuple, options: list[BlockConfig], bench) -> BlockConfig:
    """The fastest of ``options`` by ``bench(config) -> milliseconds``, measured once per key.

    A config that fails to run (e.g. out of resources on this GPU) counts as infinitely slow.
    """
    if key not in _tuned:
        def timed(c):
            try:
                return float(bench(c))
            except Exception:  # noqa: BLE001 - a config the device rejects is just not a candidate
                return float("inf")

        times = [timed(c) for c in options]
        best = min(range(len(options)), key=times.__getitem__)
        if times[best] == float("inf"):
            raise RuntimeError(f"autotuning {key}: none of {len(options)} configs ran")
        _tuned[key] = options[best]
    return _tuned[key]


def tuned_configs() -> dict[tuple, BlockConfig]:
    """The configs autotuning chose in this process, by (kernel, shape bucket, dtype, device, tile, fma, conv)."""
    return dict(_tuned)


def _usable(options: list[BlockConfig], exclude) -> list[BlockConfig]:
    usable = [c for c in options if c not in exclude]
    if not usable:
        raise RuntimeError(f"every block config that fits was refused by the device for resources: {options}")
    return usable


_refused: dict[tuple, set] = {}  # (kernel, dtype, device index) -> configs a launch was refused for


def refused_key(device, kernel: str | None, dtype) -> tuple:
    dev = torch_device(device)
    return (kernel, str(dtype), dev.index if dev.index is not None else 0)


def run_fitting(launch, cfg: BlockConfig, rechoose, key: tuple, explicit: bool = False):
    """``launch(cfg)``; when the device refuses a chosen config for resources (Triton's OutOfResources:
    shared memory or registers beyond the device's limit), remember it under ``key`` (see
    :func:`refused_key`) and launch ``rechoose()``, which no longer offers it. A config the caller
    gave explicitly (``explicit``) is never replaced: its error is raised."""
    while True:
        try:
            return launch(cfg)
        except Exception as e:  # noqa: BLE001 - only OutOfResources is handled; the rest is re-raised
            if explicit or type(e).__name__ != "OutOfResources":
                raise
            _refused.setdefault(key, set()).add(cfg)
            replacement = rechoose()
            if replacement == cfg:
                raise
            cfg = replacement


def refused_configs() -> dict[tuple, set]:
    """Configs a device refused in this process, by (kernel, dtype, device index)."""
    return {k: set(v) for k, v in _refused.items()}


def choose(device, m: int, n: int, k: int, element_size: int, kernel: str | None = None, bench=None,
           block_tile: tuple[int, int, int] | None = None, dtype=None,
           b_element_size: int | None = None, fma: bool = False, conv: bool = False) -> BlockConfig:
    """The config a launch on ``device`` uses for an (m x k) @ (k x n) product.

    Under the interpreter or off CUDA: INTERPRETER_CONFIG. On CUDA with autotuning on
    (:func:`set_autotune`) and a ``bench(config) -> ms`` given: the fastest candidate
    that fits the device's shared memory (and holds whole hash tiles where possible),
    timed once per (kernel, shape bucket, dtype). Otherwise (and for a shape not yet tuned
    while a CUDA graph is being captured) the heuristic :func:`pick`. Configs the device
    refused for this (kernel, dtype) (:func:`run_fitting`) are never offered again.
    """
    if interpreting() or torch_device(device).type != "cuda":
        return INTERPRETER_CONFIG
    dev = torch_device(device)
    index = dev.index if dev.index is not None else 0
    if index not in _devices:
        _devices[index] = (shared_memory_limit(dev), cuda_arch(dev))
    limit, arch = _devices[index]
    refused = _refused.get(refused_key(dev, kernel, dtype or element_size), set())
    if autotune_enabled() and bench is not None and kernel is not None:
        key = (kernel, shape_bucket(m, n, k), str(dtype or element_size), index, block_tile, fma, conv)
        if key in _tuned and _tuned[key] in refused:
            del _tuned[key]
        if key in _tuned or not _capturing():  # no timing inside a CUDA graph capture
            options = _usable(candidates(limit, element_size, block_tile, b_element_size, fma, conv, arch),
                              refused)
            return tune(key, options, bench)
    return pick(m, n, k, limit, element_size, block_tile, b_element_size, exclude=refused, fma=fma,
                conv=conv, arch=arch)


def _capturing() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def torch_device(device):
    import torch

    return torch.device(device)
