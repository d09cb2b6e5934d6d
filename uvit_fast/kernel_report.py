"""What a GPU would get from every kernel, compiled ahead of time on a machine without one.

``uvit-fast kernels [--arch sm_90|sm_80] [--json]`` runs the real launchers of ``uvit_fast.kernels``
on CPU tensors of the flagship model shapes while Triton believes it targets an sm_90 (or sm_80)
GPU, and turns every launch into a compile: Triton's own binder derives the specialisations it
would derive on the GPU (16-byte pointer alignment from ``data_ptr``, integers divisible by 16),
and an autotuned kernel compiles every config its own prune function keeps. Each compiled kernel
is then read for registers, local memory (spills), shared memory, blocks per SM, the tensor-core
instruction of each ``tl.dot``, the widest global load and asynchronous copies (cp.async / TMA).
An op the target cannot run (the FP8 linears, sm_89+, on sm_80) compiles nothing: its cases are
one ``n/a`` row each, with the reason.

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
    prune function, not compiled), ``skipped`` (kept, but not compiled: ``max_configs``), ``oversize`` (compiled, but needs more shared memory than a block
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
def compile_only(arch: Any = "sm_90", kernels: Optional[List[str]] = None,
                 max_configs: Optional[int] = None, seen: Optional[List[str]] = None) -> Iterator[List[Launch]]:
    """Within the block, every ``kernel[grid](...)`` launch compiles for ``arch`` instead of running.

    Yields the list that collects one :class:`Launch` per launch. Autotuned kernels compile every
    config their ``early_config_prune`` keeps (the others are recorded as ``pruned``); compile
    errors are recorded, not raised. Kernel outputs stay as the launcher allocated them.
    ``kernels``: compile only kernels whose name contains one of these strings (others are skipped).
    ``max_configs``: compile only the first N kept configs of an autotuned kernel (the rest are
    recorded as ``skipped``): the CI tests' representative subset.
    ``seen``: a list that gets the name of every kernel launched, filtered out or not.
    """
    import torch
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.driver import driver
    from triton.runtime.jit import KernelInterface

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_only needs a process without TRITON_INTERPRET=1 (the interpreter never compiles)")
    a = get_arch(arch)
    launches: List[Launch] = []

    def compile_one(kernel, grid, args, kwargs, cfg_kwargs, cfg, order, pre_hook=None):
        meta = dict(zip(kernel.arg_names, args), **kwargs, **cfg_kwargs)
        if isinstance(kernel, Heuristics):  # heuristics may feed the grid
            for name, heur in kernel.values.items():
                meta.setdefault(name, heur(meta))
        if pre_hook is not None:  # a config's pre-hook, as the autotuner runs it (e.g. TMA block shapes)
            pre_hook(meta)
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
        name = _jit_name(kernel)
        if seen is not None:
            seen.append(name)
        if kernels and not any(k in name for k in kernels):
            return
        if isinstance(kernel, Autotuner):
            if len(kernel.configs) > 1:
                kernel.nargs = dict(zip(kernel.arg_names, args))
                try:
                    kept = kernel.prune_configs(kwargs)
                finally:
                    kernel.nargs = None
            else:
                kept = list(kernel.configs)
            tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")}  # the launcher's own tiles
            results = [compile_one(kernel.fn, grid, args, kwargs, c.all_kwargs(), dict(tiles, **_config_dict(c)), i,
                                   c.pre_hook)
                       if max_configs is None or i < max_configs else
                       ConfigResult(config=dict(tiles, **_config_dict(c)), status="skipped", order=i)
                       for i, c in enumerate(kept)]
            results += [ConfigResult(config=dict(tiles, **_config_dict(c)), status="pruned")
                        for c in kernel.configs if c not in kept]
            launches.append(Launch(name, True, results))
        else:
            opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            cfg = dict({k: v for k, v in kwargs.items() if k.isupper()}, **opts)
            launches.append(Launch(name, False, [compile_one(kernel, grid, args, kwargs, {}, cfg, 0)]))

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
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared(?:::\w+)?\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
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
        size = int(m.group(1), 0)
        out[size] = out.get(size, 0) + 1
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
        "widest_load": max(list(loads) + list(cp), default=0),  # ld.global or cp.async, bytes
        "widest_ld_global": max(loads, default=0),
        "cp_async": sum(cp.values()),
        "cp_async_sizes": cp,
        "loop_cp_async": sum(loop_cp.values()),
        "loop_cp_async_sizes": loop_cp,
        "loops": _loops(ptx),
        "tma": len(_TMA.findall(ptx)),
    }


def _loops(ptx: str) -> List[Dict[str, Any]]:
    """Per loop: its global loads and cp.async (bytes per instruction: count) and the bytes one
    thread reads per iteration."""
    out = []
    for span in _loop_spans(ptx):
        loads, cp = _global_loads(ptx, [span]), _cp_async(ptx, [span])
        nbytes = sum(w * n for w, n in loads.items()) + sum(w * n for w, n in cp.items())
        out.append({"loads": loads, "cp_async": cp, "bytes": nbytes})
    return out


def main_loops(facts: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The main loops of a kernel: those whose loads add up to more than three quarters of the bytes
    (summed instruction widths) of the loop that reads most: the full-step K/V loops of each program
    tile, masked and unmasked. A tail-step loop over the last, partial block steps at most half the
    rows of its main loop (16 against 32 or more); its remainder columns can leave one element per
    thread, whose narrow instructions lift its sum to about 0.6 of the main loop's (attention at
    head_dim 72 compiled for sm_90 with a 16-row tail step: dK/dV 32 against 52, dQ 20 against 40;
    16-bit inputs now take a 32-row tail where the main step allows it, but configs whose main step
    is 16 rows keep such tails), still under 3/4."""
    loops = [lp for lp in facts["loops"] if lp["bytes"]]
    if not loops:
        return []
    top = max(lp["bytes"] for lp in loops)
    return [lp for lp in loops if 4 * lp["bytes"] > 3 * top]


def loop_load_width(facts: Dict[str, Any]) -> Tuple[int, int]:
    """``(widest, narrowest)`` bytes per instruction of the global reads inside loops (``ld.global``
    and ``cp.async``); ``(0, 0)`` when a kernel has no loop reads."""
    widths = [int(w) for w in (*facts["loop_loads"], *facts["loop_cp_async_sizes"])]  # str keys after JSON
    return (max(widths), min(widths)) if widths else (0, 0)


# ------------------------------------------------------------------------------------------------
# The flagship shapes and the launches of every kernel at them
# ------------------------------------------------------------------------------------------------

DTYPES = ("bf16", "fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One model's kernel shapes. ``tokens`` counts the extras (non-patch tokens) too."""

    name: str
    title: str
    dim: int
    heads: int
    tokens: int
    batch: int
    ops: Tuple[str, ...]
    extras: int = 0
    causal: bool = False
    image: Tuple[int, ...] = ()  # (C, [T,] H, W) of the patch embedding's input
    patch: Tuple[int, ...] = ()  # ([t,] p, p)
    out_chans: int = 0  # channels the decoder writes
    norm: str = "ln"  # "ln": LayerNorm with weight and bias; "adaln": DiT's modulation, no affine
    prefix: bool = False  # patch embedding writes a class token (CLIP / ViViT)


SHAPES: Tuple[Shape, ...] = (
    Shape("uvit-h2", "U-ViT-H/2 (latent 256 px)", 1152, 16, 258, 32, extras=2, image=(4, 32, 32), patch=(2, 2),
          out_chans=4, ops=("adaln", "adaln_residual", "patchify", "decoder", "skip_linear", "attention",
                                "fused_linear", "fp8_linear")),
    Shape("dit-xl2", "DiT-XL/2 (latent 256 px)", 1152, 16, 256, 32, image=(4, 32, 32), patch=(2, 2), out_chans=8,
          norm="adaln", ops=("adaln", "adaln_residual", "patchify", "decoder", "attention", "fused_linear",
                             "fp8_linear")),
    Shape("uvit-m4", "U-ViT-M/4 (ImageNet 64 px)", 768, 12, 258, 32, extras=2, image=(3, 64, 64), patch=(4, 4),
          out_chans=3, ops=("adaln", "adaln_residual", "patchify", "decoder", "skip_linear", "attention")),
    Shape("clip-l14-text", "CLIP ViT-L/14 text tower (causal)", 768, 12, 77, 32, causal=True,
          ops=("adaln", "adaln_residual", "attention")),
    Shape("clip-l14-vision", "CLIP ViT-L/14 image patch embedding", 1024, 16, 257, 8, image=(3, 224, 224),
          patch=(14, 14), prefix=True, ops=("patchify",)),
    Shape("vivit-b", "ViViT-B tubelet embedding 2x16x16", 768, 12, 3137, 2, image=(3, 32, 224, 224),
          patch=(2, 16, 16), prefix=True, ops=("patchify",)),
)

OPS = ("adaln", "adaln_residual", "patchify", "decoder", "skip_linear", "attention", "fused_linear", "fp8_linear")

# ops that run in some dtypes only (others: every one of DTYPES): the FP8 linears quantize a bfloat16
# block's activations and write bfloat16 (uvit_fast.quantize keeps the model's dtype)
OP_DTYPES: Dict[str, Tuple[str, ...]] = {"fp8_linear": ("bf16",)}
# ops that need a newer GPU than some archs: (compute capability, why); on older archs the report
# lists them as not applicable instead of compiling them (their launchers refuse such GPUs)
OP_MIN_CAPABILITY: Dict[str, Tuple[int, str]] = {
    "fp8_linear": (89, "FP8 (e4m3) needs compute capability 8.9 or newer (Ada, Hopper)"),
}
# the kernels such an op launches (a --kernel filter that matches none of them drops its n/a row)
OP_KERNELS: Dict[str, Tuple[str, ...]] = {"fp8_linear": ("_quantize_rows_kernel", "_fp8_linear_fwd_kernel")}


def not_applicable(op: str, arch: Any) -> Optional[str]:
    """Why ``op`` does not run on ``arch`` (None when it does): the FP8 linears on sm_80."""
    need = OP_MIN_CAPABILITY.get(op)
    a = get_arch(arch)
    if need is None or a.capability >= need[0]:
        return None
    return f"not applicable on {a.name} ({a.gpu}): {need[1]}"


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _randn(*shape, dtype):
    import torch

    return torch.randn(*shape).to(dtype)


def _launch_adaln(s: Shape, dt, residual: bool) -> None:
    from uvit_fast.kernels import adaln_layer_norm as k

    B, L, D = s.batch, s.tokens, s.dim
    x = _randn(B, L, D, dtype=dt)
    if s.norm == "adaln":  # DiT: shift/scale/gate are chunks of one (B, 6D) modulation
        mod = _randn(B, 6 * D, dtype=dt)
        shift, scale, gate = mod[:, :D], mod[:, D:2 * D], mod[:, 2 * D:3 * D]
        weight = bias = None
        eps, offset = 1e-6, 1.0
    else:
        shift = scale = gate = None
        weight, bias = _randn(D, dtype=dt), _randn(D, dtype=dt)
        eps, offset = 1e-5, 0.0
    dy = _randn(B, L, D, dtype=dt)
    if residual:
        branch = _randn(B, L, D, dtype=dt)
        xn, y, mean, rstd = k.residual_adaln_layer_norm_forward(x, branch, gate, shift, scale, weight, bias, eps,
                                                                offset, dt, dt)
        k.adaln_layer_norm_backward(dy, dy, xn, branch, gate, shift, scale, weight, bias, mean, rstd, offset, dt,
                                    residual=True)
    else:
        y, mean, rstd = k.adaln_layer_norm_forward(x, shift, scale, weight, bias, eps, offset, dt)
        k.adaln_layer_norm_backward(dy, None, x, None, None, shift, scale, weight, bias, mean, rstd, offset, dt)


def _launch_patchify(s: Shape, dt) -> None:
    from uvit_fast.kernels import patchify_embed as k

    x = _randn(s.batch, *s.image, dtype=dt)
    weight = _randn(s.dim, s.image[0], *s.patch, dtype=dt)
    n_patch = s.tokens - (1 if s.prefix else s.extras)
    # CLIP's conv has no bias and a class token; U-ViT's extras (time, label) are written by the model
    bias = None if s.prefix else _randn(s.dim, dtype=dt)
    prefix = _randn(1, 1, s.dim, dtype=dt) if s.prefix else None
    pos = _randn(1, s.tokens if s.prefix else n_patch, s.dim, dtype=dt)
    out = k.patchify_embed_forward(x, weight, bias, prefix, pos)
    k.patchify_embed_backward(_randn(*out.shape, dtype=dt), x, weight, extras=1 if s.prefix else 0,
                              need_bias=bias is not None)


def _launch_decoder(s: Shape, dt) -> None:
    from uvit_fast.kernels import decoder_unpatchify as k

    tokens = _randn(s.batch, s.tokens, s.dim, dtype=dt)
    n_out = s.out_chans
    for p in s.patch:
        n_out *= p
    weight, bias = _randn(n_out, s.dim, dtype=dt), _randn(n_out, dtype=dt)
    grid = tuple(n // p for n, p in zip(s.image[1:], s.patch))
    img = k.decoder_unpatchify_forward(tokens, weight, bias, s.patch, grid, extras=s.extras)
    k.decoder_unpatchify_backward(_randn(*img.shape, dtype=dt), tokens, weight, s.patch, grid, extras=s.extras)


def _launch_skip_linear(s: Shape, dt) -> None:
    from uvit_fast.kernels import skip_concat_linear as k

    B, L, D = s.batch, s.tokens, s.dim
    h, skip = _randn(B, L, D, dtype=dt), _randn(B, L, D, dtype=dt)
    weight, bias = _randn(D, 2 * D, dtype=dt), _randn(D, dtype=dt)
    k.skip_concat_linear_forward(h, skip, weight, bias)
    dy = _randn(B, L, D, dtype=dt)
    k.skip_concat_linear_backward_input(dy, weight)
    k.skip_concat_linear_backward_weight(dy, h, skip, compute_bias=True)
    k.skip_concat_linear_backward_weight(dy, h, skip, compute_bias=False)


def _launch_attention(s: Shape, dt) -> None:
    from uvit_fast.kernels import attention as k

    B, L, H = s.batch, s.tokens, s.heads
    hd = s.dim // H
    qkv = _randn(B, L, 3, H, hd, dtype=dt)  # the models' packed qkv projection, read through views
    q, kk, v = qkv.unbind(2)
    out, stats = k.attention_forward(q, kk, v, causal=s.causal)
    k.attention_qkvpacked_backward(_randn(*out.shape, dtype=dt), qkv, out, stats, causal=s.causal)


def _launch_fused_linear(s: Shape, dt) -> None:
    """The block's linears through kernels/fused_linear.py: qkv (bias), fc1 + GELU (pre-activation
    stored), fc2 + residual (DiT: + per-sample gate), and their backward GEMMs (fc2's input gradient
    with GELU' in its epilogue); in 16-bit dtypes also fc2 with autocast's float32 residual stream
    (float32 residual and output, a float32 dy into its backward GEMMs)."""
    import torch

    from uvit_fast.kernels import fused_linear as k

    B, L, D = s.batch, s.tokens, s.dim
    M, H = B * L, 4 * D
    act = "gelu_tanh" if s.norm == "adaln" else "gelu"  # DiT's MLP uses the tanh form, U-ViT's the erf one
    gate = _randn(B, D, dtype=dt) if s.norm == "adaln" else None
    x = _randn(M, D, dtype=dt)
    w_qkv, b_qkv = _randn(3 * D, D, dtype=dt), _randn(3 * D, dtype=dt)
    w1, b1, w2, b2 = _randn(H, D, dtype=dt), _randn(H, dtype=dt), _randn(D, H, dtype=dt), _randn(D, dtype=dt)
    k.fused_linear_forward(x, w_qkv, b_qkv)
    h, z = k.fused_linear_forward(x, w1, b1, activation=act, store_preact=True)
    h, z = _randn(M, H, dtype=dt), _randn(M, H, dtype=dt)  # compile-only: the launches above wrote nothing
    k.fused_linear_forward(h, w2, b2, residual=x, gate=gate, gate_rows=L)
    dy = _randn(M, D, dtype=dt)
    dz = k.fused_linear_backward_input(dy, w2, gate=gate, gate_rows=L, act_input=act, preact_input=z)
    k.fused_linear_backward_weight(dy, h, gate=gate, gate_rows=L, compute_bias=True)
    if gate is not None:
        k.fused_linear_backward_gate(dy, _randn(M, D, dtype=dt), activation=None, gate_rows=L, num_gates=B)
    dz = _randn(M, H, dtype=dt)
    k.fused_linear_backward_input(dz, w1)
    k.fused_linear_backward_weight(dz, x, compute_bias=True)
    k.activation_backward(dz, z, act)
    if dt in (torch.float16, torch.bfloat16):  # autocast's float32 residual stream: fc2 + it, a float32 dy
        x32, dy32 = _randn(M, D, dtype=torch.float32), _randn(M, D, dtype=torch.float32)
        k.fused_linear_forward(h, w2, b2, residual=x32, gate=gate, gate_rows=L)
        k.fused_linear_backward_input(dy32, w2, gate=gate, gate_rows=L, act_input=act, preact_input=z)
        k.fused_linear_backward_weight(dy32, h, gate=gate, gate_rows=L, compute_bias=True)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_fp8_linear(s: Shape, dt) -> None:
    """The block's linears as :func:`uvit_fast.quantize` runs them (kernels/fp8_linear.py, bfloat16
    output): the attention output's rows quantized to e4m3 (``quantize_rows`` at K = D; the norms
    write qkv's and fc1's inputs themselves), then the FP8 GEMM with the block's epilogue: qkv (DiT:
    bias; U-ViT-H/2 has none), proj (bias: the block adds its residual in the residual LayerNorm),
    fc1 + GELU (DiT: tanh form) writing its rows' partial maxima, and fc2 + residual (DiT: +
    per-sample gate) quantizing its bf16 input in the kernel, as :func:`uvit_fast.layers.mlp_residual`
    calls them; U-ViT: the long skip's ``[h, skip]`` quantize (K = 2D)."""
    import torch

    from uvit_fast.kernels import fp8_linear as k

    B, L, D = s.batch, s.tokens, s.dim
    M, H = B * L, 4 * D
    dit = s.norm == "adaln"
    act = "gelu_tanh" if dit else "gelu"
    gate = _randn(B, D, dtype=dt) if dit else None

    def weight(n, kk):  # per-output-channel e4m3 weight, as quantize_fp8_weight stores it
        return torch.randn(n, kk).to(k.FP8_DTYPE), torch.rand(n) + 0.5

    def quantized(kk):  # the activations' rows quantized (compile-only: the launch writes nothing)
        k.quantize_rows(_randn(M, kk, dtype=dt))
        return torch.randn(M, kk).to(k.FP8_DTYPE), torch.rand(M) + 0.5

    x = _randn(M, D, dtype=dt)  # the residual stream
    (w_qkv, s_qkv), (w_proj, s_proj) = weight(3 * D, D), weight(D, D)
    (w1, s1), (w2, s2) = weight(H, D), weight(D, H)
    xq, xs = quantized(D)  # proj's input (the attention output, (M, D) too) is the same launch: not repeated
    k.fp8_linear_forward(xq, xs, w_qkv, s_qkv, _randn(3 * D, dtype=dt) if dit else None, out_dtype=torch.bfloat16)
    k.fp8_linear_forward(xq, xs, w_proj, s_proj, _randn(D, dtype=dt), out_dtype=torch.bfloat16)
    # the MLP as uvit_fast.ops.fp8.fp8_mlp runs it: fc1's epilogue writes h and its rows' partial
    # maxima (AMAX_OUT); fc2 quantizes its bf16 h tiles in registers (A_QUANT), no quantize pass
    h = _randn(M, H, dtype=torch.bfloat16)
    amax = torch.rand(M, triton_cdiv(H, k.MIN_BLOCK_N)) + 0.5
    k.fp8_linear_forward(xq, xs, w1, s1, _randn(H, dtype=dt), activation=act, out_dtype=torch.bfloat16,
                         amax_out=True)
    k.fp8_linear_forward(h, None, w2, s2, _randn(D, dtype=dt), residual=x, gate=gate, gate_rows=L,
                         out_dtype=torch.bfloat16, x_amax=amax)
    if not dit:  # U-ViT's long skip: the rows of [h, skip] quantized without the concat, then its GEMM
        k.quantize_rows(_randn(M, D, dtype=dt), _randn(M, D, dtype=dt))


_LAUNCHERS: Dict[str, Callable] = {
    "adaln": lambda s, dt: _launch_adaln(s, dt, residual=False),
    "adaln_residual": lambda s, dt: _launch_adaln(s, dt, residual=True),
    "patchify": _launch_patchify,
    "decoder": _launch_decoder,
    "skip_linear": _launch_skip_linear,
    "attention": _launch_attention,
    "fused_linear": _launch_fused_linear,
    "fp8_linear": _launch_fp8_linear,
}


@dataclasses.dataclass
class Case:
    shape: Shape
    op: str
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.shape.name}/{self.op}/{self.dtype}"


def cases(shapes=None, ops=None, dtypes=None) -> List[Case]:
    """Every (shape, op, dtype), filtered by shape names / op names / dtype names."""
    out = []
    for s in SHAPES:
        if shapes and s.name not in shapes:
            continue
        for op in s.ops:
            if ops and op not in ops:
                continue
            for dt in OP_DTYPES.get(op, DTYPES):
                if not dtypes or dt in dtypes:
                    out.append(Case(s, op, dt))
    return out


def run_case(case: Case, arch: Any = "sm_90", kernels: Optional[List[str]] = None,
             max_configs: Optional[int] = None, seen: Optional[List[str]] = None) -> List[Launch]:
    """Compile every launch of ``case`` for ``arch`` (see :func:`compile_only` for the filters).
    A case :func:`not_applicable` on ``arch`` (FP8 on sm_80) launches nothing: ``[]``."""
    if not_applicable(case.op, arch):
        return []
    with compile_only(arch, kernels=kernels, max_configs=max_configs, seen=seen) as launches:
        _LAUNCHERS[case.op](case.shape, _torch_dtype(case.dtype))
    return launches


def rows(case: Case, launches: List[Launch], arch: Any) -> List[Dict[str, Any]]:
    """One flat dict per (launch, config): the report's rows. A case :func:`not_applicable` on
    ``arch`` is one row of status ``n/a`` with the reason in ``error``."""
    reason = not_applicable(case.op, arch)
    if reason and not launches:
        return [{"shape": case.shape.name, "op": case.op, "dtype": case.dtype, "kernel": "-", "config": {},
                 "status": "n/a", "order": None, "programs": None, "error": reason}]
    out = []
    for launch in launches:
        for r in launch.results:
            row = {"shape": case.shape.name, "op": case.op, "dtype": case.dtype, "kernel": launch.kernel,
                   "config": r.config, "status": r.status, "order": r.order, "programs": r.programs,
                   "error": r.error}
            if r.compiled is not None:
                row.update(kernel_facts(r.compiled, arch))
            out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


def _config_text(row: Dict[str, Any]) -> str:
    cfg = row["config"]
    if not cfg:
        return "-"
    tiles = [f"{k.replace('BLOCK_', 'B')}{v}" for k, v in cfg.items() if k.startswith("BLOCK_") and "TAIL" not in k]
    warps = row.get("num_warps", cfg.get("num_warps", "?"))  # the compiled value where there is one
    stages = row.get("num_stages", cfg.get("num_stages", "?"))
    return " ".join(tiles + [f"w{warps}", f"s{stages}"])


def _load_text(row: Dict[str, Any]) -> str:
    loads = row.get("loads") or {}
    if not loads:
        return "-"
    w = max(loads)
    kind = f"v{w // 4}.b32" if w >= 8 else ("b32" if w == 4 else f"b{8 * w}")
    return f"{kind} ({w} B)"


def _async_text(row: Dict[str, Any]) -> str:
    parts = []
    if row.get("cp_async"):
        parts.append(f"cp.async x{row['cp_async']} ({'/'.join(str(k) for k in sorted(row['cp_async_sizes']))} B)")
    if row.get("tma"):
        parts.append(f"TMA x{row['tma']}")
    return ", ".join(parts) or "none"


def format_table(report_rows: List[Dict[str, Any]]) -> str:
    """A fixed-width text table, one line per (case, kernel, config)."""
    head = ("case", "kernel", "config", "#", "status", "regs", "spill B", "smem KiB", "blk/SM", "mma",
            "widest ld.global", "async copies")
    lines = [head]
    for r in report_rows:
        ok = r["status"] in ("compiled", "oversize")
        lines.append((
            f"{r['shape']}/{r['op']}/{r['dtype']}", r["kernel"].lstrip("_"), _config_text(r),
            "-" if r["order"] is None else str(r["order"]),
            r["status"] if r["status"] not in ("error", "n/a") else f"{r['status']}: {r['error']}",
            str(r["regs"]) if ok else "", str(r["spill_bytes"]) if ok else "",
            f"{r['smem'] / 1024:.1f}" if ok else "", str(r["blocks_per_sm"]) if ok else "",
            r["mma"] if ok else "", _load_text(r) if ok else "", _async_text(r) if ok else "",
        ))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(head))]
    widths[4] = min(widths[4], 40)
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def iter_report(arch: Any = "sm_90", shapes=None, ops=None, dtypes=None, kernels=None,
                progress: Optional[bool] = None,
                seen: Optional[List[str]] = None) -> Iterator[Tuple[Case, List[Dict[str, Any]]]]:
    """Compile every selected case for ``arch``, yielding ``(case, rows)`` as each case is done."""
    import sys

    selected = cases(shapes, ops, dtypes)
    if not selected:
        raise ValueError(f"no case matches shapes={shapes} ops={ops} dtypes={dtypes}; shapes are "
                         f"{[s.name for s in SHAPES]}, ops {list(OPS)}, dtypes {list(DTYPES)}")
    if progress is None:
        progress = sys.stderr.isatty()
    it = selected
    if progress:
        from tqdm import tqdm

        it = tqdm(selected, desc=f"compiling for {get_arch(arch).name}", unit="case", file=sys.stderr)
    for case in it:
        if progress:
            it.set_postfix_str(case.name)
        if (kernels and not_applicable(case.op, arch)
                and not any(k in name for k in kernels for name in OP_KERNELS.get(case.op, ()))):
            yield case, []  # not applicable on this arch, and not asked for by --kernel
            continue
        yield case, rows(case, run_case(case, arch, kernels, seen=seen), arch)


def report(arch: Any = "sm_90", shapes=None, ops=None, dtypes=None, kernels=None,
           progress: Optional[bool] = None) -> List[Dict[str, Any]]:
    """Compile every selected case for ``arch`` and return all rows (see :func:`rows`)."""
    out: List[Dict[str, Any]] = []
    for _, case_rows in iter_report(arch, shapes, ops, dtypes, kernels, progress):
        out.extend(case_rows)
    return out


def run(args) -> int:
    """``uvit-fast kernels``: see :func:`uvit_fast.cli_args.add_kernels_arguments`."""
    import json
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("uvit-fast kernels: unset TRITON_INTERPRET (the interpreter never compiles)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    if args.cache_dir:
        import triton

        triton.knobs.cache.dir = args.cache_dir
    a = get_arch(args.arch)
    if not cases(args.shape, args.op, args.dtype):
        known = ", ".join(f"{s.name} ({'/'.join(s.ops)})" for s in SHAPES)
        only = "".join(f"; {op} runs in {'/'.join(d)} only" for op, d in OP_DTYPES.items())
        print(f"uvit-fast kernels: no case matches --shape {args.shape} --op {args.op} --dtype {args.dtype}; "
              f"the shapes and their ops: {known}{only}", file=sys.stderr)
        return 2
    if not args.json:
        print(f"# {a.name} ({a.gpu}: {a.sms} SMs, {a.smem_per_block // 1024} KiB shared memory per block, "
              f"64K registers per SM); compiled ahead of time, nothing run", flush=True)
    n_errors = n_rows = 0
    seen: List[str] = []
    try:
        # rows are printed as each case is done (one table per case), so a run cut short keeps them
        for _, case_rows in iter_report(a, args.shape, args.op, args.dtype, args.kernel, progress=args.progress,
                                        seen=seen):
            n_rows += len(case_rows)
            n_errors += sum(r["status"] == "error" for r in case_rows)
            if args.json:
                for r in case_rows:
                    print(json.dumps(r, default=str))
            elif case_rows:
                print(format_table(case_rows) + "\n")
            sys.stdout.flush()
    except ValueError as exc:
        print(f"uvit-fast kernels: {exc}", file=sys.stderr)
        return 2
    if args.kernel and not n_rows:  # a typo in --kernel compiled nothing: say so, not an empty report
        print(f"uvit-fast kernels: no kernel name contains {' or '.join(map(repr, args.kernel))}; the selected "
              f"cases launch: {', '.join(dict.fromkeys(seen)) or 'nothing'}", file=sys.stderr)
        return 2
    return 1 if n_errors and args.strict else 0
