"""Compile the ROAST kernels for a GPU that is not here: Triton's compiler and ptxas, no device.

    with compile_only(arch=90) as launches:            # sm_90: H100 / H200
        roast_matmul(a, memory, mapping, 0.5, True, config=cfg)   # CPU tensors: nothing runs
    for launch in launches:
        launch.kernel, launch.shared_bytes, launch.registers, launch.spill_bytes

Inside the block every Triton launch is compiled, down to a cubin, for the given CUDA
architecture, exactly as the launch would be specialized on that GPU (argument types,
constexprs, warps and stages), and recorded instead of run; the wrappers' outputs are
left unwritten. What a compile reports: the dynamic shared memory the kernel asks for
(Triton's metadata); from the cubin (``cuobjdump --dump-resource-usage``, shipped with
Triton), registers per thread and stack + local (spill) bytes; from the PTX, how many
tensor-core instructions (wgmma on sm_90, mma.sync before) and asynchronous copies it
has. So a machine without a GPU can check that every kernel compiles for a target, fits
its shared memory and spills nothing, before a GPU session spends its time on it
(``benchmarks/compile_check.py``).

Needs Triton's NVIDIA backend (the default wheel has it) and Triton kernels that are not
interpreted: TRITON_INTERPRET must be unset when the kernel modules are imported.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch


@dataclass
class CompiledLaunch:
    """One launch compiled for the target."""

    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    constexprs: dict
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None  # stack + local memory per thread: registers that did not fit
    seconds: float
    tensor_core_ops: int = 0  # wgmma (sm_90) / mma.sync (sm_80, sm_89) instructions in the PTX
    async_copies: int = 0  # cp.async instructions: global -> shared copies the pipeline overlaps with math


class _CompileOnlyDriver:
    """The part of Triton's driver interface a JIT launch consults before it runs."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # JIT functions cache their binder (and its target) per device: one key per architecture
        return f"compile-only-sm{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> str | None:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack + local memory bytes per thread) of a cubin's kernel; None where unknown.

    Registers that do not fit are spilled to the thread's stack frame, so a stack above 0 means
    spills (slow local-memory traffic) in a Triton kernel, which calls no functions."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              timeout=120).stdout
    regs, stack, local = (re.search(rf"{name}:(\d+)", text) for name in ("REG", "STACK", "LOCAL"))
    if regs is None:
        return None, None
    return int(regs.group(1)), sum(int(m.group(1)) for m in (stack, local) if m)


@contextlib.contextmanager
def compile_only(arch: int = 90, warp_size: int = 32):
    """Within the block, Triton launches compile for CUDA ``arch`` (e.g. 90, 80, 89) and do not run.

    Yields the list of `CompiledLaunch` records, filled as launches happen.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_only needs compiled Triton kernels: unset TRITON_INTERPRET before importing "
                           "roastfx's kernel modules")
    if not isinstance(arch, int) or isinstance(arch, bool) or arch < 70:
        raise ValueError(f"arch must be a CUDA compute capability as an int >= 70 (e.g. 80, 89, 90), got {arch!r}")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launches: list[CompiledLaunch] = []
    original_run = JITFunction.run
    # the driver that was active (None on a machine without one: reset_active() would try to create it and fail)
    previous = getattr(driver, "_active", None)

    def run(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        seconds = time.perf_counter() - start
        md = compiled.metadata
        regs, spill = resource_usage(compiled.asm["cubin"])
        names = [p.name for p in self.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        constexprs = {p.name: bound[p.name] for p in self.params if p.is_constexpr and p.name in bound}
        ptx = compiled.asm.get("ptx", "")
        launches.append(CompiledLaunch(self.fn.__name__, arch, md.num_warps, md.num_stages, constexprs,
                                       int(md.shared), regs, spill, seconds,
                                       len(re.findall(r"\bwgmma\.mma_async|\bmma\.sync", ptx)),
                                       len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx))))
        return None  # nothing was launched

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, warp_size)))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        driver._active = previous
