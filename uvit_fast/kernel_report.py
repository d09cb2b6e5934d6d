"""What a GPU would get from every kernel, compiled ahead of time on a machine without one.

``uvit-fast kernels [--arch sm_90|sm_80] [--json]`` runs the real launchers of ``uvit_fast.kernels``
on CPU tensors of the flagship model shapes while Triton believes it targets an sm_90 (or sm_80)
GPU, and turns every launch into a compile: Triton's own binder derives the specialisations it
would derive on the GPU (16-byte pointer alignment from ``data_ptr``, integers divisible by 16),
and an autotuned kernel compiles every config its own prune function keeps. Each compiled kernel
is then read for registers, local memory (spills), shared memory, blocks per SM, the tensor-core
instruction of each ``tl.dot``, the widest global load and asynchronous copies (cp.async / TMA).

Harness API (importable on its own; nothing here needs a GPU)::

    from uvit_fast.kernel_report import compile_only, kernel_facts
    with compile_only("sm_90") as launches:
        attention_forward(q, k, v)                    # CPU tensors; nothing runs
    for launch in launches:                            # one per kernel launch
        for r in launch.results:                       # one per config (autotune: every config)
            print(launch.kernel, r.config, r.status, r.error)
            if r.compiled is not None:
                print(kernel_facts(r.compiled, "sm_90"))

Inside ``compile_only`` the launchers see their tensors on ``cuda:0`` (``Tensor.device`` reports
it and factory calls on ``cuda`` allocate on the CPU) and ``torch.cuda.get_device_properties``
reports the target GPU's SM count, so they take their GPU code paths (program tiles, split
counts). Must run without ``TRITON_INTERPRET=1`` (the interpreter never compiles).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import subprocess
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

# ------------------------------------------------------------------------------------------------
# Targets
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one GPU generation (flagship part: H100 SXM / A100 SXM)."""

    name: str
    capability: int
    gpu: str
    sms: int
    smem_per_block: int  # opt-in maximum per block, bytes
    smem_per_sm: int  # bytes
    smem_reserved: int = 1024  # per block, taken by the driver
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


ARCHS: Dict[str, Arch] = {
    "sm_90": Arch("sm_90", 90, "H100", 132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    "sm_80": Arch("sm_80", 80, "A100", 108, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}


def get_arch(arch: Any) -> Arch:
    """``"sm_90"``, ``"90"``, ``90`` or an :class:`Arch` -> :class:`Arch`."""
    if isinstance(arch, Arch):
        return arch
    key = str(arch)
    key = key if key.startswith("sm_") else f"sm_{key}"
    if key not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}; got {arch!r}")
    return ARCHS[key]


# ------------------------------------------------------------------------------------------------
# Capture of launches
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConfigResult:
    """One config of one launch. ``status``: ``compiled``, ``pruned`` (dropped by the kernel's own
    prune function, not compiled), ``oversize`` (compiled, but needs more shared memory than a block
    may have: the autotuner would drop it at benchmark time) or ``error`` (compilation failed)."""

    config: Dict[str, Any]
    status: str
    order: Optional[int] = None  # position among the kept configs (0: the first autotune tries)
    compiled: Any = None
    error: Optional[str] = None
    programs: Optional[int] = None  # grid size, when it could be evaluated


@dataclasses.dataclass
class Launch:
    kernel: str
    autotuned: bool
    results: List[ConfigResult]


def _jit_name(fn) -> str:
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn._fn_name.rsplit(".", 1)[-1]


def _config_dict(cfg) -> Dict[str, Any]:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _programs(grid, meta) -> Optional[int]:
    try:
        g = grid(meta) if callable(grid) else grid
        n = 1
        for x in g:
            n *= int(x)
        return n
    except Exception:  # noqa: BLE001 - the grid is informative only
        return None


class _FakeDriver:
    """A Triton driver whose current target is the requested GPU; it can compile, never launch."""

    def __init__(self, arch: Arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch.capability, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton keeps one binder (with its target) per device id: one id per arch
        return self.arch.capability

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise RuntimeError("compile_only: nothing is benchmarked without a GPU")


def _device_props(arch: Arch):
    return type("DeviceProperties", (), {
        "name": f"{arch.gpu} (compile-only)", "multi_processor_count": arch.sms,
        "major": arch.capability // 10, "minor": arch.capability % 10,
    })()


def _as_cuda_mode():
    """A TorchFunctionMode under which CPU tensors report ``cuda:0`` and ``cuda`` allocations land
    on the CPU, so launchers take their GPU paths while Triton reads real CPU ``data_ptr``s."""
    import torch
    from torch.overrides import TorchFunctionMode

    device_attr = torch._C.TensorBase.device
    is_cuda_attr = torch._C.TensorBase.is_cuda

    def cpu(d):
        if isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda":
            return torch.device("cpu")
        return d

    class AsCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            owner = getattr(func, "__self__", None)
            if owner is device_attr:
                return torch.device("cuda", 0)
            if owner is is_cuda_attr:
                return True
            args = tuple(cpu(a) for a in args)
            kwargs = {k: cpu(v) for k, v in (kwargs or {}).items()}
            if getattr(func, "__name__", "") == "cuda":
                return args[0]
            return func(*args, **kwargs)

    return AsCuda()


@contextlib.contextmanager
def compile_only(arch: Any = "sm_90") -> Iterator[List[Launch]]:
    """Within the block, every ``kernel[grid](...)`` launch compiles for ``arch`` instead of running.

    Yields the list that collects one :class:`Launch` per launch. Autotuned kernels compile every
    config their ``early_config_prune`` keeps (the others are recorded as ``pruned``); compile
    errors are recorded, not raised. Kernel outputs stay as the launcher allocated them.
    """
    import torch
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.driver import driver
    from triton.runtime.jit import KernelInterface

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_only needs a process without TRITON_INTERPRET=1 (the interpreter never compiles)")
    a = get_arch(arch)
    launches: List[Launch] = []

    def compile_one(kernel, grid, args, kwargs, cfg_kwargs, cfg, order):
        meta = dict(zip(kernel.arg_names, args), **kwargs, **cfg_kwargs)
        if isinstance(kernel, Heuristics):  # heuristics may feed the grid
            for name, heur in kernel.values.items():
                meta.setdefault(name, heur(meta))
        res = ConfigResult(config=cfg, status="compiled", order=order, programs=_programs(grid, meta))
        try:
            compiled = kernel.run(*args, grid=grid, warmup=True, **kwargs, **cfg_kwargs)
        except Exception as exc:  # noqa: BLE001 - a failing config is a row of the report
            res.status, res.error = "error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
            return res
        res.compiled = compiled
        if compiled.metadata.shared > a.smem_per_block:
            res.status = "oversize"
            res.error = f"shared memory {compiled.metadata.shared} B > {a.smem_per_block} B per block"
        return res

    def launch(kernel, grid, args, kwargs):
        if isinstance(kernel, Autotuner):
            name = _jit_name(kernel.fn)
            if len(kernel.configs) > 1:
                kernel.nargs = dict(zip(kernel.arg_names, args))
                try:
                    kept = kernel.prune_configs(kwargs)
                finally:
                    kernel.nargs = None
            else:
                kept = list(kernel.configs)
            results = [compile_one(kernel.fn, grid, args, kwargs, c.all_kwargs(), _config_dict(c), i)
                       for i, c in enumerate(kept)]
            results += [ConfigResult(config=_config_dict(c), status="pruned") for c in kernel.configs if c not in kept]
            launches.append(Launch(name, True, results))
        else:
            opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            cfg = dict({k: v for k, v in kwargs.items() if k.isupper()}, **opts)
            launches.append(Launch(_jit_name(kernel), False, [compile_one(kernel, grid, args, kwargs, {}, cfg, 0)]))

    def getitem(kernel, grid):
        return lambda *args, **kwargs: launch(kernel, grid, args, kwargs)

    saved = (KernelInterface.__getitem__, torch.cuda.get_device_properties, torch.cuda.current_device,
             torch.cuda.get_device_capability, torch.cuda.device)
    previous_driver = driver._active  # None unless a driver was made active (none on a CPU machine)
    driver.set_active(_FakeDriver(a))
    KernelInterface.__getitem__ = getitem
    torch.cuda.get_device_properties = lambda *_, **__: _device_props(a)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda *_, **__: (a.capability // 10, a.capability % 10)
    torch.cuda.device = lambda *_, **__: contextlib.nullcontext()  # launchers' device guards
    try:
        with _as_cuda_mode():
            yield launches
    finally:
        (KernelInterface.__getitem__, torch.cuda.get_device_properties, torch.cuda.current_device,
         torch.cuda.get_device_capability, torch.cuda.device) = saved
        driver._active = previous_driver


# ------------------------------------------------------------------------------------------------
# Facts of one compiled kernel
# ------------------------------------------------------------------------------------------------

_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[\w:]+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared(?:::\w+)?\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(\d+)")
_TMA = re.compile(r"\bcp\.async\.bulk\.tensor\b")
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")
_DOT = re.compile(r"=\s*(ttng\.warp_group_dot|tt\.dot)\s.*?:\s*(?:!ttg\.memdesc|tensor)<(\d+)x(\d+)x(\w+?)[,>]"
                  r".*?->\s*tensor<(\d+)x(\d+)x\w+,\s*#(\w+)")
_LAYOUT = re.compile(r"^#(\w+)\s*=\s*#ttg\.(\w+)<\{(?:versionMajor\s*=\s*(\d+))?", re.M)


def _loop_spans(ptx: str) -> List[Tuple[int, int]]:
    """Character spans of loops: from a label to a later branch back to it."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(ptx)}
    return [(labels[m.group(1)], m.end()) for m in _BRANCH.finditer(ptx)
            if m.group(1) in labels and labels[m.group(1)] < m.start()]


def _global_loads(ptx: str, spans=None) -> Dict[int, int]:
    """``{bytes per thread per instruction: count}`` of ``ld.global`` (in ``spans`` when given)."""
    out: Dict[int, int] = {}
    for m in _LD_GLOBAL.finditer(ptx):
        if spans is not None and not any(a <= m.start() < b for a, b in spans):
            continue
        width = int(m.group(2) or 1) * int(m.group(3)) // 8
        out[width] = out.get(width, 0) + 1
    return out


def _cp_async(ptx: str, spans=None) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for m in _CP_ASYNC.finditer(ptx):
        if spans is not None and not any(a <= m.start() < b for a, b in spans):
            continue
        out[int(m.group(1))] = out.get(int(m.group(1)), 0) + 1
    return out


def dots(ttgir: str) -> List[Dict[str, Any]]:
    """Every ``tl.dot`` of a compiled kernel: ``{"m", "n", "k", "dtype", "mma"}`` with ``mma`` one of
    ``wgmma`` (Hopper warp-group MMA), ``mma.sync`` (Ampere-style MMA) or ``fma`` (CUDA cores)."""
    layouts = {m.group(1): (m.group(2), m.group(3)) for m in _LAYOUT.finditer(ttgir)}
    out = []
    for m in _DOT.finditer(ttgir):
        op, am, ak, dtype, rm, rn, enc = m.groups()
        kind, version = layouts.get(enc, ("?", None))
        if op == "ttng.warp_group_dot":
            mma = "wgmma"
        elif kind == "nvidia_mma":
            mma = "wgmma" if version == "3" else "mma.sync"
        else:
            mma = "fma"
        out.append({"m": int(rm), "n": int(rn), "k": int(ak), "dtype": dtype, "mma": mma})
    return out


@functools.lru_cache(maxsize=4096)
def _resource_usage(cubin: bytes, name: str) -> Tuple[int, int]:
    """``(registers, local bytes per thread)`` from ``cuobjdump -res-usage`` (the values the driver
    reports as NUM_REGS and LOCAL_SIZE_BYTES; Triton's ``n_spills`` is the latter / 4)."""
    tool = get_cuobjdump_path()
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)
    m = re.search(r"Function\s+" + re.escape(name) + r"\s*:\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:\d+\s+LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage: no entry for {name}:\n{text[:1000]}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def get_cuobjdump_path() -> str:
    """The ``cuobjdump`` Triton uses (bundled with the wheel; ``TRITON_CUOBJDUMP_PATH`` overrides)."""
    import triton

    return triton.knobs.nvidia.cuobjdump.path


def blocks_per_sm(regs: int, smem: int, num_warps: int, arch: Any) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256, four 16K-register
    quadrants), shared memory (plus the per-block reservation), threads and the block limit."""
    a = get_arch(arch)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_by_regs = 4 * ((a.regs_per_sm // 4) // per_warp)
    by_regs = warps_by_regs // num_warps
    by_smem = a.smem_per_sm // (smem + a.smem_reserved)
    by_threads = a.max_threads_per_sm // (num_warps * 32)
    return max(0, min(a.max_blocks_per_sm, by_regs, by_smem, by_threads))


def kernel_facts(compiled, arch: Any) -> Dict[str, Any]:
    """Facts of one ``CompiledKernel``: registers, spill (local-memory) bytes per thread, shared
    memory, blocks per SM, dots with their MMA instruction, global load widths (whole kernel and
    inside loops), cp.async sizes and TMA copies."""
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    md = compiled.metadata
    regs, spill = _resource_usage(bytes(compiled.asm["cubin"]), md.name)
    spans = _loop_spans(ptx)
    loads, loop_loads = _global_loads(ptx), _global_loads(ptx, spans)
    cp, loop_cp = _cp_async(ptx), _cp_async(ptx, spans)
    ds = dots(ttgir)
    kinds = sorted({d["mma"] for d in ds})
    return {
        "regs": regs,
        "spill_bytes": spill,
        "smem": md.shared,
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "blocks_per_sm": blocks_per_sm(regs, md.shared, md.num_warps, arch),
        "mma": "/".join(kinds) if kinds else "none",
        "dots": ds,
        "loads": loads,
        "loop_loads": loop_loads,
        "widest_load": max(list(loads) + list(cp), default=0),
        "cp_async": sum(cp.values()),
        "cp_async_sizes": cp,
        "loop_cp_async": sum(loop_cp.values()),
        "loop_cp_async_sizes": loop_cp,
        "tma": len(_TMA.findall(ptx)),
    }


def loop_load_width(facts: Dict[str, Any]) -> Tuple[int, int]:
    """``(widest, narrowest)`` bytes per instruction of the global reads inside loops (``ld.global``
    and ``cp.async``); ``(0, 0)`` when a kernel has no loop reads."""
    widths = list(facts["loop_loads"]) + list(facts["loop_cp_async_sizes"])
    return (max(widths), min(widths)) if widths else (0, 0)
