"""skip_concat_linear: the Triton kernels (forward, dh/dskip, dweight/dbias) against float64.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), with outputs NaN-poisoned.
The interpreter pins 64x64x64 tiles, so M = 66, 258, 67 and N = 72 leave partial row/column tiles,
D = 72 leaves a partial K tile, and D = 576 / 1152 run long K loops over both halves of the weight.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from uvit_fast.ops import skip_concat_linear, skip_concat_linear_reference
from uvit_fast.testing import assert_parity, CustomOpRecorder

ON_CUDA = torch.cuda.is_available()
NEEDS_CUDA_BF16 = pytest.mark.skipif(
    not ON_CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter (triton issue 11584); needs a CUDA GPU"
)
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=NEEDS_CUDA_BF16)]


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py


def _inputs(shape, N, dtype, device, bias=True):
    D = shape[-1]
    h = torch.randn(shape, device=device, dtype=dtype)
    skip = torch.randn(shape, device=device, dtype=dtype)
    weight = torch.randn(N, 2 * D, device=device, dtype=dtype) * (2 * D) ** -0.5
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    return h, skip, weight, b


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def _check(h, skip, weight, bias, grad=None, names=("h", "skip", "weight", "bias")):
    """Triton vs PyTorch in the same dtype vs float64: output and every gradient asked for."""
    leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    base_leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    ref_leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in (h, skip, weight, bias)]

    out = skip_concat_linear(*leaves, backend="triton")
    base = skip_concat_linear_reference(*base_leaves)
    ref = skip_concat_linear_reference(*ref_leaves)
    assert out.dtype == base.dtype and out.shape == base.shape
    assert_parity(out, base, ref, name="y")

    g = torch.randn_like(out) if grad is None else grad
    out.backward(g)
    base.backward(g)
    ref.backward(g.double())
    for name, a, b, r in zip(names, leaves, base_leaves, ref_leaves):
        if a is None:
            continue
        assert a.grad is not None, f"no gradient for {name}"
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape
        assert_parity(a.grad, b.grad, r.grad, name=f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, N",
    [
        ((2, 33, 72), 72),  # M=66, partial K tile (72 = 64 + 8), N=72 partial column tile
        ((1, 258, 64), 64),  # batch 1, U-ViT token count, M=258 not a multiple of the tile
        pytest.param((1, 67, 576), 576, marks=pytest.mark.slow),  # D = 72*8: 9 K tiles over h then 9 over skip, two row tiles
    ],
)
def test_parity(shape, N, dtype, device):
    _check(*_inputs(shape, N, dtype, device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
def test_parity_d1152(dtype, device):
    """U-ViT-H width with a tiny M (the interpreter pays per program; dW alone has 18 x 36 tiles)."""
    _check(*_inputs((1, 5, 1152), 1152, dtype, device))


def _weight_grad_reference(g, h, skip):
    """dW and dbias in float64 and, for the 2x rule, in the inputs' dtype (plain PyTorch)."""
    def grads(dtype):
        gg, x = g.to(dtype).reshape(-1, g.shape[-1]), torch.cat([h, skip], -1).to(dtype).reshape(-1, 2 * h.shape[-1])
        return gg.t() @ x, gg.sum(0)
    return grads(g.dtype), grads(torch.float64)


@pytest.mark.slow  # 16 cases, a few seconds each under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
@pytest.mark.parametrize("compute_bias", [True, False])
def test_weight_grad_split_over_rows(splits, compute_bias, dtype, device):
    """The reduction over M = B*L split in parts (fp32 partials added in a fixed order): parity for
    every split count, M = 258 (parts of 129, 86, 52 rows: masked K tails inside each part)."""
    from uvit_fast.kernels.skip_concat_linear import skip_concat_linear_backward_weight

    h, skip, _, _ = _inputs((1, 258, 72), 40, dtype, device)
    g = torch.randn(1, 258, 40, device=device, dtype=dtype)
    dw, db = skip_concat_linear_backward_weight(g, h, skip, compute_bias=compute_bias, splits=splits)
    (base_w, base_b), (ref_w, ref_b) = _weight_grad_reference(g, h, skip)
    assert dw.dtype == dtype and dw.shape == (40, 144)
    assert_parity(dw, base_w, ref_w, name=f"dW splits={splits}")
    if compute_bias:
        assert_parity(db, base_b, ref_b, name=f"dbias splits={splits}")
    else:
        assert db.shape == (0,)


def test_weight_grad_split_is_deterministic(device):
    from uvit_fast.kernels.skip_concat_linear import skip_concat_linear_backward_weight

    h, skip, _, _ = _inputs((2, 77, 24), 16, torch.float32, device)
    g = torch.randn(2, 77, 16, device=device)
    first = skip_concat_linear_backward_weight(g, h, skip, splits=3)
    again = skip_concat_linear_backward_weight(g, h, skip, splits=3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_weight_grad_split_count_and_m_bucket():
    """The split count depends on the shapes and the SM count only; the autotune key rounds M up to
    a power of two (a new batch size re-uses the tuned configs)."""
    from uvit_fast.kernels.skip_concat_linear import m_bucket, weight_grad_splits

    # U-ViT-H/2 at batch 256 on an H100 (132 SMs): 162 output tiles are 1.23 waves -> 4 parts
    assert weight_grad_splits(256 * 258, 1152, 1152, 132) == 4
    # tiny M: no split (each part needs >= 1024 rows); wide outputs that fill the GPU: no split
    assert weight_grad_splits(2 * 258, 1152, 1152, 132) == 1
    assert weight_grad_splits(1 << 20, 8192, 8192, 132) == 1
    assert weight_grad_splits(1 << 20, 64, 64, 132) == 8
    assert [m_bucket(m) for m in (1, 258, 512, 513, 128 * 258, 256 * 258)] == [1, 512, 512, 1024, 65536, 131072]


def test_configs_over_the_shared_memory_limit_are_pruned(monkeypatch):
    """On the GPU list: fp32 (TF32 or exact) drops the four configs that need 256-288 KiB of shared
    memory on sm_90 (over the 227 KiB an H100 block may use); 16-bit keeps all ten (the weight
    gradient's no-bias variant needs 144 KiB at most since its two halves share one loop)."""
    from uvit_fast.kernels import skip_concat_linear as k

    monkeypatch.setattr(k, "_INTERPRET", False)
    configs = k._configs()
    assert len(configs) == 10
    for dtype, n_kept in ((torch.float32, 6), (torch.bfloat16, 10), (torch.float16, 10)):
        kept = k._prune_smem(configs, {"DY": torch.empty(1, dtype=dtype), "M": 4})
        assert len(kept) == n_kept, dtype
        assert all(k._smem_bytes(c, torch.empty(0, dtype=dtype).element_size()) <= k.SMEM_LIMIT for c in kept)
    big = [c for c in configs if k._smem_bytes(c, 4) > k.SMEM_LIMIT]
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in big} == {
        (128, 256, 3), (256, 128, 3), (128, 128, 4)}


def test_pre_hopper_prune(monkeypatch):
    """On an A100 (sm_80: mma.sync, 163 KiB per block) the configs with 128 or more accumulator
    registers per thread are dropped (they spill compiled for sm_80) and fp32 keeps only configs
    within 163 KiB; a 99 KiB GPU keeps fewer still."""
    from uvit_fast.kernels import skip_concat_linear as k

    monkeypatch.setattr(k, "_INTERPRET", False)
    configs = k._configs()
    for cap, dtype, limit in (((8, 0), torch.float16, k.SMEM_LIMIT_SM80), ((8, 0), torch.float32, k.SMEM_LIMIT_SM80),
                              ((8, 9), torch.float32, k.SMEM_LIMIT_OTHER)):
        monkeypatch.setattr(k, "_capability", lambda t: cap)
        t = torch.empty(1, dtype=dtype)
        kept = k._prune_smem(configs, {"DY": t})
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) < 128 for c in kept)
        dropped = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
                   for c in configs if c not in kept}
        assert {(128, 256, 64, 8), (256, 128, 64, 8), (128, 128, 64, 4), (128, 128, 32, 4)} <= dropped
        assert all(k._smem_bytes(c, t.element_size()) <= limit for c in kept)
        assert len(kept) < len(configs)


def test_no_bias_and_partial_grads(device):
    h, skip, weight, _ = _inputs((2, 19, 72), 40, torch.float32, device, bias=False)
    _check(h, skip, weight, None)
    # only h needs a gradient: the weight-gradient kernel must not be needed
    hl = h.clone().requires_grad_(True)
    with CustomOpRecorder() as rec:
        out = skip_concat_linear(hl, skip, weight, None, backend="triton")
        out.sum().backward()
    assert any("backward_input" in op for op in rec.ops), rec.ops
    assert not any("backward_weight" in op for op in rec.ops), rec.ops
    h64 = h.double().requires_grad_(True)
    skip_concat_linear_reference(h64, skip.double(), weight.double()).sum().backward()
    base = h.clone().requires_grad_(True)
    skip_concat_linear_reference(base, skip, weight).sum().backward()
    assert_parity(hl.grad, base.grad, h64.grad, name="dh")
    # only the weight needs a gradient
    wl = weight.clone().requires_grad_(True)
    with CustomOpRecorder() as rec:
        skip_concat_linear(h, skip, wl, None, backend="triton").sum().backward()
    assert not any("backward_input" in op for op in rec.ops), rec.ops
    w64 = weight.double().requires_grad_(True)
    skip_concat_linear_reference(h.double(), skip.double(), w64).sum().backward()
    wb = weight.clone().requires_grad_(True)
    skip_concat_linear_reference(h, skip, wb).sum().backward()
    assert_parity(wl.grad, wb.grad, w64.grad, name="dweight")


def test_strided_inputs(device):
    """Views read in place through strides: a slice of a wider buffer, a transposed weight, a
    strided bias, a (B, D, L)-transposed skip (not flattenable -> one reshape copy), a zero-stride
    (expanded) output gradient and 4-D leading dims."""
    B, L, D, N = 2, 21, 72, 48
    buf = torch.randn(B, L + 3, 3 * D, device=device)
    h = buf[:, 2 : L + 2, D : 2 * D]  # row stride 3D, leading dims flattenable
    skip = torch.randn(B, D, L, device=device).transpose(1, 2)  # column stride L
    weight = (torch.randn(2 * D, N, device=device) * (2 * D) ** -0.5).t()  # column-major (N, 2D)
    bias = torch.randn(2 * N, device=device)[::2]
    assert not h.is_contiguous() and not skip.is_contiguous() and not weight.is_contiguous()
    _check(h, skip, weight, bias)
    # the gradient of out.sum() is an expanded tensor with stride 0
    _check(h, skip, weight, bias, grad=torch.ones((), device=device).expand(B, L, N))
    # 4-D inputs
    h4 = torch.randn(2, 3, 11, D, device=device)
    _check(h4, torch.randn_like(h4), weight, bias)


def test_empty_batch(device):
    h, skip, weight, bias = _inputs((0, 7, 64), 32, torch.float32, device)
    leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    out = skip_concat_linear(*leaves, backend="triton")
    assert out.shape == (0, 7, 32)
    out.sum().backward()
    assert leaves[0].grad.shape == h.shape
    assert torch.equal(leaves[2].grad, torch.zeros_like(weight))
    assert torch.equal(leaves[3].grad, torch.zeros_like(bias))


def test_autocast_matches_linear(device):
    """Under autocast the op behaves like nn.Linear: inputs and weight cast to the autocast dtype,
    output in that dtype, gradients back in the leaves' float32."""
    amp = torch.float16  # bf16 would need bf16 tl.dot, broken under the interpreter
    h, skip, weight, bias = _inputs((2, 33, 72), 72, torch.float32, device)
    leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    base_leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    with torch.autocast(device.type, dtype=amp):
        out = skip_concat_linear(*leaves, backend="triton")
        base = skip_concat_linear_reference(*base_leaves)
    assert out.dtype == base.dtype == amp
    # float64 reference of the same computation: inputs rounded to the autocast dtype first
    ref_leaves = [t.detach().to(amp).double().requires_grad_(True) for t in (h, skip, weight, bias)]
    ref = skip_concat_linear_reference(*ref_leaves)
    assert_parity(out, base, ref, name="y (autocast)")
    g = torch.randn_like(out)
    out.backward(g)
    base.backward(g)
    ref.backward(g.double())
    for name, a, b, r in zip(("h", "skip", "weight", "bias"), leaves, base_leaves, ref_leaves):
        assert a.grad.dtype == torch.float32
        assert_parity(a.grad, b.grad, r.grad, atol=4e-3, name=f"d{name} (autocast)")


def test_opcheck(device):
    h, skip, weight, bias = _inputs((2, 9, 64), 24, torch.float32, device)
    leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    torch.library.opcheck(torch.ops.uvit_fast.skip_concat_linear.default, tuple(leaves))
    torch.library.opcheck(torch.ops.uvit_fast.skip_concat_linear.default, (h, skip, weight, None))
    g = torch.randn(2, 9, 24, device=device)
    torch.library.opcheck(torch.ops.uvit_fast.skip_concat_linear_backward_input.default, (g, weight))
    for compute_bias in (True, False):
        torch.library.opcheck(
            torch.ops.uvit_fast.skip_concat_linear_backward_weight.default, (g, h, skip, compute_bias)
        )


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    h, skip, weight, bias = _inputs((2, 17, 64), 40, torch.float32, device)

    def f(h, skip, weight, bias):
        return skip_concat_linear(h, skip, weight, bias, backend="triton").square()

    leaves = [_leaf(t) for t in (h, skip, weight, bias)]
    out = torch.compile(f, fullgraph=True)(*leaves)
    out.sum().backward()
    eager = [_leaf(t) for t in (h, skip, weight, bias)]
    expect = skip_concat_linear_reference(*eager).square()
    expect.sum().backward()
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_errors(device):
    h, skip, weight, bias = _inputs((2, 5, 8), 8, torch.float32, device)
    with pytest.raises(ValueError, match=r"h and skip must have the same shape.*\(2, 5, 8\).*\(2, 5, 7\)"):
        skip_concat_linear(h, skip[..., :7], weight, bias, backend="triton")
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 2\*D\) = \(N, 16\).*\(8, 8\)"):
        skip_concat_linear(h, skip, weight[:, :8], bias, backend="triton")
    with pytest.raises(ValueError, match=r"weight must have 2 dims; got shape \(8, 16, 1\)"):
        skip_concat_linear(h, skip, weight[..., None], bias, backend="triton")
    with pytest.raises(ValueError, match=r"bias has shape \(7,\) but weight \(8, 16\) needs \(8,\)"):
        skip_concat_linear(h, skip, weight, bias[:7], backend="triton")
    with pytest.raises(ValueError, match=r"at least 2 dims"):
        skip_concat_linear(h[0, 0], skip[0, 0], weight, bias, backend="triton")
    # h and skip of two dtypes are promoted as torch.cat promotes them (see tests/test_autocast.py);
    # the weight must then have the promoted dtype, as nn.Linear requires
    with pytest.raises(TypeError, match=r"weight must have the dtype of h and skip \(torch.float32\).*torch.float16"):
        skip_concat_linear(h.half(), skip, weight.half(), bias.half(), backend="triton")
    with pytest.raises(TypeError, match=r"weight must have the dtype of h and skip \(torch.float32\).*torch.float16"):
        skip_concat_linear(h, skip, weight.half(), bias, backend="triton")
    with pytest.raises(TypeError, match=r"bias must have the dtype of h and skip \(torch.float32\).*torch.float16"):
        skip_concat_linear(h, skip, weight, bias.half(), backend="torch")
    with pytest.raises(TypeError, match=r"backend='triton' supports float16, bfloat16 and float32; got torch.float64"):
        skip_concat_linear(h.double(), skip.double(), weight.double(), bias.double(), backend="triton")
    with pytest.raises(TypeError, match=r"h must have a floating dtype; got torch.int64"):
        skip_concat_linear(h.long(), skip.long(), weight, bias, backend="triton")
    with pytest.raises(ValueError, match=r"all tensors must be on one device.*weight on meta"):
        skip_concat_linear(h, skip, weight.to("meta"), bias, backend="triton")


@pytest.mark.skipif(ON_CUDA, reason="on a GPU the parity tests compile and run the real kernels")
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Without a GPU, prove the kernels lower to PTX/cubin for an H100 (sm_90) with one fp16 config:
    the interpreter alone does not catch constructs the compiler rejects."""
    script = textwrap.dedent(
        """
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from uvit_fast.kernels import skip_concat_linear as k

        def jit(fn):
            while not isinstance(fn, triton.runtime.jit.JITFunction):
                fn = fn.fn
            return fn

        def build(kernel, sig, consts):
            attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
                     if t != "constexpr" and n != "M"}
            c = triton.compile(ASTSource(fn=jit(kernel), signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
            assert "wgmma" in c.asm["ptx"] or "mma" in c.asm["ptx"]

        P, C = "*fp16", "constexpr"
        tile = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, INPUT_PRECISION="ieee", EVEN_K=False)
        def sig_of(kernel, ptrs, ints, unit):
            fn = jit(kernel)
            const = {fn.arg_names[i] for i in fn.constexprs} | set(unit)
            return {n: (P if n in ptrs else C if n in const else "i32") for n in fn.arg_names}
        fwd_unit = ("stride_hk", "stride_sk", "stride_wk", "stride_yn", "stride_b")
        build(k._skip_concat_linear_fwd_kernel,
              sig_of(k._skip_concat_linear_fwd_kernel, ("H", "S", "W", "BIAS", "Y"), (), fwd_unit),
              dict(tile, HAS_BIAS=True, **{n: 1 for n in fwd_unit}))
        dx_unit = ("stride_dyn", "stride_wk", "stride_dhk", "stride_dsk")
        build(k._skip_concat_linear_bwd_input_kernel,
              sig_of(k._skip_concat_linear_bwd_input_kernel, ("DY", "W", "DH", "DS"), (), dx_unit),
              dict(tile, **{n: 1 for n in dx_unit}))
        dw_unit = ("stride_dyn", "stride_hk", "stride_sk", "stride_dwk")
        build(k._skip_concat_linear_bwd_weight_kernel,
              sig_of(k._skip_concat_linear_bwd_weight_kernel, ("DY", "H", "S", "DW", "DB"), (), dw_unit),
              dict(tile, HAS_DBIAS=True, **{n: 1 for n in dw_unit}))
        print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("this triton install has no ptxas to compile for sm_90")
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_tf32_choice_follows_the_new_precision_api(monkeypatch, restore_fp32_precision):
    """torch >= 2.9 sets TF32 with ``torch.backends.cuda.matmul.fp32_precision``; reading the legacy
    ``allow_tf32`` after that raises a RuntimeError, so the kernel must read the new setting."""
    from uvit_fast.kernels import skip_concat_linear as k

    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.cuda.matmul.fp32_precision")
    monkeypatch.setattr(k, "_INTERPRET", False)  # the GPU path of the choice, without a GPU
    m.fp32_precision = "tf32"
    assert k._input_precision(torch.float32) == "tf32"
    assert k._input_precision(torch.float16) == "ieee"
    m.fp32_precision = "ieee"
    assert k._input_precision(torch.float32) == "ieee"
