"""What a GPU would get, checked without one: the kernels compiled for sm_90 / sm_80 through their
real launchers (``uvit_fast.kernel_report``) at the flagship shapes, and the facts of issue 14:

* every config compiles, or is dropped by the kernel's own prune, with at least one config left;
* 16-bit configs spill nothing;
* on sm_90, 16-bit dots of 64 or more rows use wgmma;
* attention forward, dK/dV and dQ at head_dim 72 and 64 in 16-bit: the loads of the main loops are
  at least 8 bytes wide (no 2-byte scalar loads; see ``kernel_report.main_loops``) and the K/V loop
  is pipelined (cp.async or TMA).

The compiles run in a subprocess: this test process runs Triton under the interpreter (conftest),
which never compiles. CI compiles a representative subset (the config autotune tries first, for
every kernel of the cases below; ``UVIT_FAST_FACTS_ALL_CONFIGS=1`` compiles every kept config);
``uvit-fast kernels`` is the full sweep of every shape, dtype and config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from uvit_fast import kernel_report as kr

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the parity tests compile and run the real kernels")

SIXTEEN_BIT = ("bf16", "fp16")

# (arch, shape, op, dtype): the representative CI set (first kept config of every kernel)
CI_CASES = (
    ("sm_90", "uvit-h2", "attention", "bf16"),  # head_dim 72, L 258
    ("sm_90", "uvit-m4", "attention", "fp16"),  # head_dim 64
    ("sm_90", "uvit-h2", "skip_linear", "bf16"),
    ("sm_90", "uvit-h2", "decoder", "bf16"),
    ("sm_90", "uvit-h2", "patchify", "fp16"),
    ("sm_90", "dit-xl2", "adaln_residual", "bf16"),
    ("sm_90", "uvit-h2", "adaln", "fp16"),
    ("sm_80", "uvit-h2", "attention", "fp16"),
    ("sm_80", "uvit-h2", "skip_linear", "fp16"),
)

_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from uvit_fast import kernel_report as kr
for arch, shape, op, dtype in json.loads(sys.argv[1]):
    case = kr.cases([shape], [op], [dtype])[0]
    for row in kr.rows(case, kr.run_case(case, arch, max_configs=int(sys.argv[2]) or None), arch):
        row["arch"] = arch
        print("ROW " + json.dumps(row, default=str), flush=True)
"""


def _compile(cases, max_configs=1, timeout=1200):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(cases), str(max_configs or 0)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas to compile for sm_90")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]


# UVIT_FAST_FACTS_ALL_CONFIGS=1: the same tests on every config each prune keeps (about 4x the time)
ALL_CONFIGS = os.environ.get("UVIT_FAST_FACTS_ALL_CONFIGS", "0") == "1"


@pytest.fixture(scope="module")
def ci_rows():
    return _compile([list(c) for c in CI_CASES], max_configs=None if ALL_CONFIGS else 1)


def _case_rows(rows, arch, shape, op, dtype):
    out = [r for r in rows if (r["arch"], r["shape"], r["op"], r["dtype"]) == (arch, shape, op, dtype)]
    assert out, f"no compiled rows for {arch} {shape} {op} {dtype}"
    return out


def _where(r):
    return f"{r['arch']} {r['shape']}/{r['op']}/{r['dtype']} {r['kernel']} {r['config']}"


# ------------------------------------------------------------------------------------------------
# fast: the readers of compiled code, on hand-written PTX / TTGIR
# ------------------------------------------------------------------------------------------------

_PTX = """
	@%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	@%p2 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd2 + 0 ];
	ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
	cp.async.cg.shared.global [ %r24 + 0 ], [ %rd8 + 0 ], 0x10, %r25;
	cp.async.commit_group;
	@%p3 bra 	$L__BB0_2;
$L__BB0_3:
	cp.async.ca.shared.global [ %r26 + 0 ], [ %rd9 + 0 ], 4, %r27;
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
	@%p4 bra 	$L__BB0_3;
"""

_TTGIR = """
#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [2, 2], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
    %a = ttng.warp_group_dot %x, %y, %c {inputPrecision = 0 : i32, isAsync = true} : !ttg.memdesc<128x64xbf16, #shared, #smem> * !ttg.memdesc<64x64xbf16, #shared2, #smem> -> tensor<128x64xf32, #mma> loc(#loc1)
    %b = tt.dot %x2, %y2, %c2, inputPrecision = tf32 : tensor<32x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 4}>> * tensor<64x64xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 4}>> -> tensor<32x64xf32, #mma1> loc(#loc2)
    %c = tt.dot %x3, %y3, %c3, inputPrecision = ieee : tensor<64x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<64x64xf32, #blocked> loc(#loc3)
"""


def test_ptx_readers():
    spans = kr._loop_spans(_PTX)
    assert len(spans) == 2
    assert kr._global_loads(_PTX) == {2: 1, 16: 1, 8: 1}
    assert kr._global_loads(_PTX, spans) == {16: 1, 8: 1}  # the b16 load is before the loop
    assert kr._cp_async(_PTX) == {16: 1, 4: 1}
    assert len(kr._TMA.findall(_PTX)) == 1
    loops = kr._loops(_PTX)
    assert [lp["bytes"] for lp in loops] == [16 + 8 + 16, 4]
    # the second loop reads under half the bytes of the first: not a main loop
    assert kr.main_loops({"loops": loops}) == [loops[0]]
    # attention's backward at head_dim 72 (sm_90) with a 16-row tail step (configs whose main step is
    # 16 rows): the masked and unmasked full-step loops read 52,
    # the 16-row tail loops 32 (one 2-byte element per thread for the remainder): the tails are not
    # main loops; a loop over 3/4 of the busiest is
    main, tail = {"bytes": 52}, {"bytes": 32}
    assert kr.main_loops({"loops": [main, tail, main, tail]}) == [main, main]
    assert kr.main_loops({"loops": [{"bytes": 40}, {"bytes": 31}]}) == [{"bytes": 40}, {"bytes": 31}]


def test_ttgir_dots():
    assert kr.dots(_TTGIR) == [
        {"m": 128, "n": 64, "k": 64, "dtype": "bf16", "mma": "wgmma"},
        {"m": 32, "n": 64, "k": 64, "dtype": "bf16", "mma": "mma.sync"},
        {"m": 64, "n": 64, "k": 16, "dtype": "f32", "mma": "fma"},
    ]


def test_blocks_per_sm():
    # 255 registers x 256 threads: 8 warps fit the register file once -> 1 block
    assert kr.blocks_per_sm(255, 28 * 1024, 8, "sm_90") == 1
    # registers allow 2 blocks of 4 warps at 255; smem 100 KiB (+1 KiB reserved) allows 2 on H100, 1 on A100
    assert kr.blocks_per_sm(255, 100 * 1024, 4, "sm_90") == 2
    assert kr.blocks_per_sm(128, 100 * 1024, 4, "sm_80") == 1
    # tiny kernels stop at 2048 threads per SM / 32 blocks
    assert kr.blocks_per_sm(16, 0, 1, "sm_90") == 32
    assert kr.blocks_per_sm(16, 0, 4, "sm_90") == 16
    with pytest.raises(ValueError, match="arch must be one of"):
        kr.get_arch("sm_75")


def test_cli_help_lists_kernels():
    from uvit_fast.cli_args import KERNEL_REPORT_OPS, KERNEL_REPORT_SHAPES

    assert KERNEL_REPORT_SHAPES == tuple(s.name for s in kr.SHAPES)
    assert KERNEL_REPORT_OPS == kr.OPS
    proc = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "kernels", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--arch" in proc.stdout, proc.stderr


def test_compile_only_refuses_the_interpreter():
    # this process runs under TRITON_INTERPRET=1 (conftest), which never compiles
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the interpreter of the CPU test run")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with kr.compile_only("sm_90"):
            pass


# ------------------------------------------------------------------------------------------------
# slow: compiled kernels (the CI subset: ~3 minutes cold on 2 cores)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,op,dtype", CI_CASES)
def test_every_kernel_compiles_with_a_config_left(ci_rows, arch, shape, op, dtype):
    rows = _case_rows(ci_rows, arch, shape, op, dtype)
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, krows in by_kernel.items():
        kept = [r for r in krows if r["status"] != "pruned"]
        assert kept, f"{arch} {shape}/{op}/{dtype} {kernel}: the prune left no config"
    bad = [f"{_where(r)}: {r['status']} {r['error']}" for r in rows if r["status"] in ("error", "oversize")]
    assert not bad, "configs that neither compile (within the block's shared memory) nor are pruned:\n" + "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,op,dtype", [c for c in CI_CASES if c[3] in SIXTEEN_BIT])
def test_16bit_configs_do_not_spill(ci_rows, arch, shape, op, dtype):
    rows = [r for r in _case_rows(ci_rows, arch, shape, op, dtype) if r["status"] == "compiled"]
    spilling = [f"{_where(r)}: {r['spill_bytes']} B/thread at {r['regs']} registers" for r in rows if r["spill_bytes"]]
    assert not spilling, "16-bit configs that spill:\n" + "\n".join(spilling)


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,op,dtype", [c for c in CI_CASES if c[0] == "sm_90" and c[3] in SIXTEEN_BIT])
def test_sm90_16bit_dots_of_64_rows_use_wgmma(ci_rows, arch, shape, op, dtype):
    rows = [r for r in _case_rows(ci_rows, arch, shape, op, dtype) if r["status"] == "compiled"]
    bad = [f"{_where(r)}: {d['m']}x{d['n']}x{d['k']} {d['dtype']} dot lowers to {d['mma']}"
           for r in rows for d in r["dots"] if d["m"] >= 64 and d["dtype"] in ("bf16", "f16") and d["mma"] != "wgmma"]
    assert not bad, "16-bit dots of >= 64 rows without wgmma on sm_90:\n" + "\n".join(bad)


_ATTN_KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,op,dtype", [c for c in CI_CASES if c[2] == "attention" and c[3] in SIXTEEN_BIT])
def test_attention_main_loop_loads_are_vectorised_and_pipelined(ci_rows, arch, shape, op, dtype):
    rows = [r for r in _case_rows(ci_rows, arch, shape, op, dtype)
            if r["status"] == "compiled" and r["kernel"] in _ATTN_KERNELS]
    assert {r["kernel"] for r in rows} == set(_ATTN_KERNELS)
    bad = []
    for r in rows:
        mains = kr.main_loops(r)
        assert mains, f"{_where(r)}: no loop that reads global memory"
        for lp in mains:
            widths = [int(w) for w in (*lp["loads"], *lp["cp_async"])]
            if max(widths) < 8 or 2 in widths:
                bad.append(f"{_where(r)}: main-loop loads {lp['loads']}, cp.async {lp['cp_async']} (bytes: count)")
        if not (r["cp_async"] or r["tma"]):
            bad.append(f"{_where(r)}: K/V loop not pipelined (no cp.async, no TMA)")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_acceptance_attention_fwd_hd72_bf16_first_config(ci_rows):
    """Issue 14's acceptance: the config autotune tries first, at head_dim 72 in bf16 on sm_90:
    vector loads, cp.async and no spills."""
    rows = [r for r in _case_rows(ci_rows, "sm_90", "uvit-h2", "attention", "bf16")
            if r["kernel"] == "_attn_fwd" and r["order"] == 0]
    assert len(rows) == 1
    r = rows[0]
    assert r["status"] == "compiled", r
    assert r["widest_load"] >= 8, f"widest global load {r['widest_load']} B: {r['loads']}"
    assert r["cp_async"] > 0, "no cp.async"
    assert r["spill_bytes"] == 0, f"{r['spill_bytes']} B/thread spilled at {r['regs']} registers"


@pytest.mark.slow
def test_cli_kernels_runs_without_a_gpu():
    """``uvit-fast kernels --arch sm_90`` (one small kernel: the filters keep it quick) prints rows
    and JSON with the facts, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "uvit_fast.cli", "kernels", "--arch", "sm_90", "--shape", "dit-xl2", "--op", "adaln",
            "--dtype", "bf16", "--kernel", "_adaln_fwd", "--no-progress"]
    proc = subprocess.run(args + ["--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["kernel"] for r in rows] == ["_adaln_fwd_kernel"]
    r = rows[0]
    assert r["status"] == "compiled" and r["spill_bytes"] == 0 and r["mma"] == "none"
    assert r["widest_load"] == 16  # D = 1152 rows of 16-byte-aligned bf16: ld.global.v4
    assert r["programs"] == 32 * 256  # one program per row
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "adaln_fwd_kernel" in proc.stdout and "sm_90" in proc.stdout, proc.stderr[-3000:]
    # the interpreter compiles nothing: a clear refusal
    proc = subprocess.run(args, capture_output=True, text=True, env=dict(env, TRITON_INTERPRET="1"), timeout=600)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
