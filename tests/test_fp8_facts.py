"""The FP8 linears (kernels/fp8_linear.py) compiled for sm_90 without a GPU (``uvit_fast.kernel_report``,
op ``fp8_linear``), at U-ViT-H/2 (D 1152, 4D 4608, 258 tokens, batch 32: qkv without bias, proj +
bias, fc1 + GELU, fc2 + residual) and DiT-XL/2 (256 tokens: qkv + bias, proj + bias, fc1 + tanh
GELU, fc2 + residual + per-sample gate), bfloat16 activations and output, every config the prune
keeps (all of them on the TMA path at these shapes):

* the GEMM's dot is an FP8 wgmma: the TTGIR dot has e4m3 operands and lowers to a warp-group MMA,
  and the PTX issues ``wgmma.mma_async`` with ``.e4m3.e4m3`` operands and nothing else;
* its x and weight tiles come through TMA: two ``cp.async.bulk.tensor`` loads in the loop of the
  wgmmas and no ``ld.global`` / ``cp.async`` there; the output is stored through TMA;
* no register spills, shared memory within sm_90's 227 KiB per block and no more than the prune's
  own estimate (:func:`kernels.fp8_linear.smem_bytes`);
* the row quantization spills nothing and reads its rows with 16-byte vector loads (``ld.global.v4.b32``,
  8 bfloat16) in both of its K loops (the amax pass and the quantizing pass).

On sm_80 the op is not applicable (FP8 needs sm_89+): the report lists it as ``n/a`` and compiles
nothing (the quick test below). The compiles run in a subprocess without ``TRITON_INTERPRET`` (this
process runs the interpreter, which never compiles): 150 s cold on 2 cores, 20 s with a warm
Triton cache (the module fixture, measured). ``uvit-fast kernels --op fp8_linear`` prints the same facts as a table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from uvit_fast import kernel_report as kr

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="on a GPU the parity tests compile and run the real kernels")

CASES = (("sm_90", "uvit-h2", "bf16"), ("sm_90", "dit-xl2", "bf16"))
GEMM = "_fp8_linear_fwd_kernel"
QUANT = "_quantize_rows_kernel"

_SCRIPT = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
from uvit_fast import kernel_report as kr
tma_load = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global")
tma_store = re.compile(r"\bcp\.async\.bulk\.tensor\.\dd\.global\.shared")
wgmma = re.compile(r"\bwgmma\.mma_async(?:\.\w+)*")
st_global = re.compile(r"\bst\.global((?:\.[\w:]+)*?)(?:\.v(\d))?\.[bfsu](\d+)\b")
for arch, shape, dtype in json.loads(sys.argv[1]):
    case = kr.cases([shape], ["fp8_linear"], [dtype])[0]
    launches = kr.run_case(case, arch)
    extra = []
    for launch in launches:
        for r in launch.results:
            if r.compiled is None:
                extra.append({})
                continue
            ptx = r.compiled.asm["ptx"]
            dot_loops = [(a, b) for a, b in kr._loop_spans(ptx) if "wgmma.mma_async" in ptx[a:b]]
            inner = min(dot_loops, key=lambda s: s[1] - s[0]) if dot_loops else (0, 0)
            stores = {}
            for m in st_global.finditer(ptx):
                w = int(m.group(2) or 1) * int(m.group(3)) // 8
                stores[w] = stores.get(w, 0) + 1
            extra.append({"wgmma_ptx": sorted(set(wgmma.findall(ptx))),
                          "wgmma_in_dot_loop": len(wgmma.findall(ptx[inner[0]:inner[1]])),
                          "tma_loads_in_dot_loop": len(tma_load.findall(ptx[inner[0]:inner[1]])),
                          "tma_stores": len(tma_store.findall(ptx)),
                          "dot_loop_loads": kr._global_loads(ptx, [inner]),
                          "dot_loop_cp_async": kr._cp_async(ptx, [inner]),
                          "stores": stores})
    for row, e in zip(kr.rows(case, launches, arch), extra):
        row.update(e, arch=arch)
        print("ROW " + json.dumps(row, default=str), flush=True)
"""


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([list(c) for c in CASES])],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this triton install has no ptxas to compile for sm_90")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]


def _compiled(rows, arch, shape, kernel):
    out = [r for r in rows if (r["arch"], r["shape"], r["kernel"]) == (arch, shape, kernel) and r["status"] == "compiled"]
    assert out, f"no compiled rows for {arch} {shape} {kernel}"
    return out


def _where(r):
    return f"{r['arch']} {r['shape']}/{r['dtype']} {r['kernel']} {r['config']}"


# ------------------------------------------------------------------------------------------------
# quick: sm_80 is not applicable (nothing compiles), the op's cases
# ------------------------------------------------------------------------------------------------


def test_fp8_linear_cases_and_sm80_not_applicable():
    assert "fp8_linear" in kr.OPS
    assert [(c.shape.name, c.dtype) for c in kr.cases(ops=["fp8_linear"])] == [("uvit-h2", "bf16"), ("dit-xl2", "bf16")]
    assert kr.not_applicable("fp8_linear", "sm_90") is None
    assert kr.not_applicable("fused_linear", "sm_80") is None
    case = kr.cases(["uvit-h2"], ["fp8_linear"])[0]
    assert kr.run_case(case, "sm_80") == []  # refused before anything compiles (this process: the interpreter)
    (row,) = kr.rows(case, [], "sm_80")
    assert row["status"] == "n/a" and "8.9" in row["error"] and "sm_80" in row["error"]
    table = kr.format_table([row])
    assert "uvit-h2/fp8_linear/bf16" in table and "n/a: not applicable on sm_80" in table


# ------------------------------------------------------------------------------------------------
# slow: compiled for sm_90, every kept config
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_every_kept_config_compiles(rows, arch, shape, dtype):
    """The quantize launches (the attention output at K = D; U-ViT: its long skip's [h, skip] too) and
    four GEMMs (qkv, proj, fc1 writing its rows' partial maxima, fc2 quantizing its bf16 input in the
    kernel); every config the prune keeps compiles (none skipped) within the block's shared memory."""
    mine = [r for r in rows if (r["arch"], r["shape"], r["dtype"]) == (arch, shape, dtype)]
    assert {r["kernel"] for r in mine} == {QUANT, GEMM}
    quants = [r for r in mine if r["kernel"] == QUANT]
    assert len(quants) == (2 if shape == "uvit-h2" else 1)
    firsts = [r for r in mine if r["kernel"] == GEMM and r["order"] == 0]
    assert len(firsts) == 4
    firsts = [r for r in mine if r["kernel"] == GEMM and r["order"] == 0]
    assert len(firsts) == 4
    bad = [f"{_where(r)}: {r['status']} {r['error']}" for r in mine if r["status"] not in ("compiled", "pruned")]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_no_spills_and_shared_memory_within_the_limit(rows, arch, shape, dtype):
    from uvit_fast.kernels.fp8_linear import smem_bytes
    import triton

    limit = kr.get_arch(arch).smem_per_block
    bad = []
    # the GEMM launches in order: qkv, proj, fc1 (AMAX_OUT), fc2 (A_QUANT: 16-bit x tiles, a_elem 2)
    launch_of, n = {}, -1
    for r in rows:
        if (r["arch"], r["shape"], r["dtype"], r["kernel"]) == (arch, shape, dtype, GEMM):
            n += r["order"] == 0
            launch_of[id(r)] = n
    for kernel in (QUANT, GEMM):
        for r in _compiled(rows, arch, shape, kernel):
            if r["spill_bytes"]:
                bad.append(f"{_where(r)}: {r['spill_bytes']} B/thread spilled at {r['regs']} registers")
            if r["smem"] > limit:
                bad.append(f"{_where(r)}: shared memory {r['smem']} B > {limit} B")
            if kernel == GEMM:
                c = dict(r["config"])
                cfg = triton.Config({k: v for k, v in c.items() if k.isupper()}, num_warps=c["num_warps"],
                                    num_stages=c["num_stages"])
                est = smem_bytes(cfg, 2, True, a_elem=2 if launch_of[id(r)] == 3 else 1)  # bf16 output, TMA epilogue
                if r["smem"] > est:  # (equal, compiled for sm_90 with Triton 3.9)
                    bad.append(f"{_where(r)}: shared memory {r['smem']} B > the prune's estimate {est} B")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_gemm_dot_is_an_fp8_wgmma(rows, arch, shape, dtype):
    bad = []
    for r in _compiled(rows, arch, shape, GEMM):
        if not r["dots"] or any(d["mma"] != "wgmma" or d["dtype"] != "f8E4M3FN" for d in r["dots"]):
            bad.append(f"{_where(r)}: dots {r['dots']}")
        forms = r["wgmma_ptx"]
        if not forms or any(not f.endswith(".e4m3.e4m3") for f in forms) or not r["wgmma_in_dot_loop"]:
            bad.append(f"{_where(r)}: PTX wgmma {forms}, {r['wgmma_in_dot_loop']} in the dot loop")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_gemm_tiles_come_through_tma(rows, arch, shape, dtype):
    """Two TMA loads (the x and weight tiles) in the loop of the wgmmas, no ld.global or cp.async
    there; the bfloat16 output goes out through TMA stores."""
    bad = [f"{_where(r)}: {r['tma_loads_in_dot_loop']} TMA loads, ld.global {r['dot_loop_loads']}, cp.async "
           f"{r['dot_loop_cp_async']} in the dot loop; {r['tma_stores']} TMA stores"
           for r in _compiled(rows, arch, shape, GEMM)
           if r["tma_loads_in_dot_loop"] != 2 or r["dot_loop_loads"] or r["dot_loop_cp_async"] or not r["tma_stores"]]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arch,shape,dtype", CASES)
def test_quantize_reads_rows_with_16_byte_vectors(rows, arch, shape, dtype):
    """Both K loops (amax, then quantize) load 16 bytes per instruction (ld.global.v4.b32: 8
    bfloat16), nothing narrower, also over the two halves of U-ViT's [h, skip]; one program per 16
    rows (BLOCK_M 16 x BLOCK_K 128 at K = 1152: 9 full column steps)."""
    qrows = _compiled(rows, arch, shape, QUANT)
    s = kr.SHAPES[[x.name for x in kr.SHAPES].index(shape)]
    assert [r["programs"] for r in qrows] == [-(-s.batch * s.tokens // 16)] * (2 if shape == "uvit-h2" else 1)
    bad = []
    for r in qrows:
        loops = [lp for lp in r["loops"] if lp["bytes"]]
        if len(loops) < 2 or any(set(lp["loads"]) != {"16"} for lp in loops) or set(r["loads"]) != {"16"}:
            bad.append(f"{_where(r)}: loads {r['loads']}, loops {r['loops']}")
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_cli_lists_fp8_kernels_and_sm80_not_applicable():
    """``uvit-fast kernels --op fp8_linear``: the FP8 kernels' rows on sm_90 (here the quantize kernel
    only: ``--kernel`` keeps it quick); on sm_80 one ``n/a`` row per case, exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base = [sys.executable, "-m", "uvit_fast.cli", "kernels", "--op", "fp8_linear", "--no-progress"]
    proc = subprocess.run(base + ["--shape", "dit-xl2", "--kernel", "_quantize", "--json"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["kernel"] for r in out] == [QUANT]  # DiT: the attention output's (the norms quantize the rest)
    assert all(r["status"] == "compiled" and r["spill_bytes"] == 0 and r["widest_load"] == 16 for r in out)
    proc = subprocess.run(base + ["--arch", "sm_80"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("n/a: not applicable on sm_80") == 2, proc.stdout
    proc = subprocess.run(base + ["--dtype", "fp16"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2 and "fp8_linear runs in bf16 only" in proc.stderr
