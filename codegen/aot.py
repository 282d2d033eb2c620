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
    loop: LoopProfile | None = None  # the machine code of the main loop (None: no loop with a dot)


@dataclass
class LoopProfile:
    """The SASS of a kernel's main loop: the innermost loop that holds its dot (tensor-core or FMA
    instructions), as ``nvdisasm`` prints it. Counts are instructions per thread per iteration, as written
    (a predicated instruction counts once; calls are listed, their bodies are not counted)."""

    instructions: int
    tensor_core: int  # HGMMA (sm_90) / HMMA instructions
    opcodes: dict  # opcode (without modifiers) -> count
    calls: int

    @property
    def local_memory_ops(self) -> int:
        """Loads and stores of the thread's local memory (spilled registers) inside the loop."""
        return self.opcodes.get("LDL", 0) + self.opcodes.get("STL", 0)

    def integer_ops(self) -> int:
        """Integer and logic arithmetic: where the hashing, addressing and sign flips go."""
        return sum(n for op, n in self.opcodes.items() if op in _INTEGER_OPS)


_INTEGER_OPS = {"IMAD", "IADD3", "IADD", "VIADD", "LOP3", "SHF", "LEA", "ISETP", "SEL", "IABS", "IMNMX", "VIMNMX",
                "PRMT", "BMSK", "SGXT", "POPC", "FLO", "I2F", "F2I", "I2I", "IMUL", "ISCADD", "PLOP3"}
_DOT_OPS = ("HGMMA", "HMMA", "FFMA")


def disassemble(cubin: bytes) -> str | None:
    """The cubin's SASS (``nvdisasm``, shipped with Triton), or None where the tool is missing."""
    tool = _cuobjdump()
    tool = tool and os.path.join(os.path.dirname(tool), "nvdisasm")
    if not tool or not os.access(tool, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, timeout=120).stdout


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def main_loop(sass: str) -> LoopProfile | None:
    """The innermost loop (a backward branch's range) that holds a dot instruction: tensor-core MMAs, or FFMA
    for an fp32 dot on the FMA units. None when no loop holds one."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _SASS_LINE.match(line)
        if not m:
            continue
        address, text = int(m.group(1), 16), m.group(2)
        for name in pending:
            labels[name] = address
        pending = []
        opcode = re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0]
        instructions.append((address, opcode.split(".")[0], text))
    best = None
    for address, opcode, text in instructions:
        target = re.search(r"`\((\.L_x_\d+)\)", text) if opcode == "BRA" else None
        start = labels.get(target.group(1)) if target else None
        if start is None or start > address:
            continue
        body = [op for a, op, _ in instructions if start <= a <= address]
        if any(op in _DOT_OPS for op in body) and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        return None
    counts: dict[str, int] = {}
    for op in best:
        counts[op] = counts.get(op, 0) + 1
    return LoopProfile(len(best), counts.get("HGMMA", 0) + counts.get("HMMA", 0), dict(sorted(counts.items())),
                       counts.get("CALL", 0))


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
        sass = disassemble(compiled.asm["cubin"])
        launches.append(CompiledLaunch(self.fn.__name__, arch, md.num_warps, md.num_stages, constexprs,
                                       int(md.shared), regs, spill, seconds,
                                       len(re.findall(r"\bwgmma\.mma_async|\bmma\.sync", ptx)),
                                       len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
                                       main_loop(sass) if sass else None))
        return None  # nothing was launched

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, warp_size)))
    JITFunction.run = run
    try:
        yield launches
    finally:
        JITFunction.run = original_run
        driver._active = previous
