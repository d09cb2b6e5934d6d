"""The fused-linear GEMMs compiled for sm_90 / sm_80 without a GPU (``uvit_fast.kernel_report``), at
U-ViT-H/2 (D 1152, 4D 4608, 258 tokens, batch 32: qkv, fc1 + GELU with the pre-activation stored,
fc2 + residual, and their backward) and DiT-XL/2 (256 tokens, tanh GELU, fc2 + residual + per-sample
gate, and the gate gradient). Facts of issue 16:

* every kernel compiles with a config left, none over the block's shared memory;
* 16-bit configs spill nothing;
* sm_90: 16-bit dots of 64 or more rows use wgmma; every GEMM reads its two operand tiles through
  TMA inside the loop that runs the dots (the forward also stores through TMA); the only other
  reads in that loop are the backward's gate tiles, as 16-byte cp.async;
* sm_80: mma.sync, 16-byte cp.async in the main loops, no TMA.

The compiles run in a subprocess without ``TRITON_INTERPRET`` (this process runs the interpreter,
which never compiles). CI compiles the config each kernel's autotuner tries first;
``UVIT_FAST_FACTS_ALL_CONFIGS=1`` compiles every config the prunes keep. ``uvit-fast kernels --op
fused_linear`` prints the same facts as a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the parity tests compile and run the real kernels"),
]

CASES = (
    ("sm_90", "uvit-h2", "bf16"),
    ("sm_90", "dit-xl2", "bf16"),
    ("sm_90", "uvit-h2", "fp16"),
    ("sm_80", "uvit-h2", "fp16"),
)
GEMMS = ("_fused_linear_fwd_kernel", "_fused_linear_bwd_input_kernel", "_fused_linear_bwd_weight_kernel")

_SCRIPT = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from uvit_fast import kernel_report as kr
tma_load = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global")
tma_store = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.global\.shared")
for arch, shape, dtype in json.loads(sys.argv[1]):
    case = kr.cases([shape], ["fused_linear"], [dtype])[0]
    launches = kr.run_case(case, arch, max_configs=int(sys.argv[2]) or None)
    extra = [[] for _ in launches]
    for i, launch in enumerate(launches):
        for r in launch.results:
            if r.compiled is None:
                extra[i].append({})
                continue
            ptx = r.compiled.asm["ptx"]
            dot_loops = [(a, b) for a, b in kr._loop_spans(ptx) if "mma" in ptx[a:b]]
            inner = min(dot_loops, key=lambda s: s[1] - s[0]) if dot_loops else (0, 0)
            extra[i].append({"tma_loads_in_dot_loop": len(tma_load.findall(ptx[inner[0]:inner[1]])),
                             "tma_stores": len(tma_store.findall(ptx)),
                             "dot_loop_loads": kr._global_loads(ptx, [inner]),
                             "dot_loop_cp_async": kr._cp_async(ptx, [inner])})
    rows = kr.rows(case, launches, arch)
    flat = [e for per_launch in extra for e in per_launch]
    for row, e in zip(rows, flat):
        row.update(e, arch=arch)
        print("ROW " + json.dumps(row, default=str), flush=True)
"""

ALL_CONFIGS = os.environ.get("UVIT_FAST_FACTS_ALL_CONFIGS", "0") == "1"


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([list(c) for c in CASES]),
                           "0" if ALL_CONFIGS else "1"], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas to compile for sm_90")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]


def _compiled(rows, arch, shape, dtype, kernels=None):
    out = [r for r in rows if (r["arch"], r["shape"], r["dtype"]) == (arch, shape, dtype) and r["status"] == "compiled"
           and (kernels is None or r["kernel"] in kernels)]
    assert out, f"no compiled rows for {arch} {shape} {dtype} {kernels or ''}"
    return out


def _where(r):
    return f"{r['arch']} {r['shape']}/{r['dtype']} {r['kernel']} {r['config']}"


@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_every_kernel_compiles_with_a_config_left(rows, arch, shape, dtype):
    mine = [r for r in rows if (r["arch"], r["shape"], r["dtype"]) == (arch, shape, dtype)]
    kernels = {r["kernel"] for r in mine}
    assert set(GEMMS) <= kernels and "_activation_bwd_kernel" in kernels
    if shape == "dit-xl2":
        assert "_fused_linear_bwd_gate_kernel" in kernels
    for kernel in kernels:
        assert [r for r in mine if r["kernel"] == kernel and r["status"] != "pruned"], f"{kernel}: no config left"
    bad = [f"{_where(r)}: {r['status']} {r['error']}" for r in mine if r["status"] in ("error", "oversize")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_16bit_configs_do_not_spill(rows, arch, shape, dtype):
    spilling = [f"{_where(r)}: {r['spill_bytes']} B/thread at {r['regs']} registers"
                for r in _compiled(rows, arch, shape, dtype) if r["spill_bytes"]]
    assert not spilling, "\n".join(spilling)


@pytest.mark.parametrize("arch,shape,dtype", [c for c in CASES if c[0] == "sm_90"])
def test_sm90_dots_use_wgmma(rows, arch, shape, dtype):
    gemm_rows = _compiled(rows, arch, shape, dtype, GEMMS)
    assert all(r["dots"] for r in gemm_rows)
    bad = [f"{_where(r)}: {d['m']}x{d['n']}x{d['k']} {d['dtype']} -> {d['mma']}"
           for r in gemm_rows for d in r["dots"] if d["m"] >= 64 and d["mma"] != "wgmma"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch,shape,dtype", [c for c in CASES if c[0] == "sm_90"])
def test_sm90_gemms_read_their_tiles_through_tma_in_the_dot_loop(rows, arch, shape, dtype):
    """Two TMA loads (the operand tiles) in the loop of the dots (the pipelined K loop) of every GEMM;
    no ld.global there, and cp.async (the backward's gate tiles) only of 16 bytes; the forward's
    epilogue stores through TMA. Three forward launches (qkv, fc1 + GELU, fc2 + residual)."""
    gemm_rows = _compiled(rows, arch, shape, dtype, GEMMS)
    assert len([r for r in gemm_rows if r["kernel"] == GEMMS[0]]) >= 3
    bad = [f"{_where(r)}: {r['tma_loads_in_dot_loop']} TMA loads, ld.global {r['dot_loop_loads']}, cp.async "
           f"{r['dot_loop_cp_async']} in the dot loop; {r['tma_stores']} TMA stores"
           for r in gemm_rows
           if r["tma_loads_in_dot_loop"] < 2 or r["dot_loop_loads"] or set(r["dot_loop_cp_async"]) - {"16"}
           or (r["kernel"] == GEMMS[0] and not r["tma_stores"])]
    assert not bad, "\n".join(bad)


def test_sm80_gemms_pipeline_16_byte_copies(rows):
    """On sm_80 the GEMMs read through pointers: the loop of their dots (the innermost loop holding
    the MMAs: the K loop, inside the forward's persistent tile loop) copies 16 bytes per cp.async
    instruction and issues no other global loads."""
    bad = [f"{_where(r)}: dot loop loads {r['dot_loop_loads']}, cp.async {r['dot_loop_cp_async']} (bytes: count)"
           for r in _compiled(rows, "sm_80", "uvit-h2", "fp16", GEMMS)
           if r["dot_loop_loads"] or set(r["dot_loop_cp_async"]) != {"16"}]
    assert not bad, "\n".join(bad)


def test_sm80_uses_mma_sync_and_no_tma(rows):
    gemm_rows = _compiled(rows, "sm_80", "uvit-h2", "fp16", GEMMS)
    bad = [f"{_where(r)}: {d['mma']}" for r in gemm_rows for d in r["dots"] if d["mma"] != "mma.sync"]
    assert not bad, "\n".join(bad)
    assert not any(r["tma"] for r in gemm_rows)
