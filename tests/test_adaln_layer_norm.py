"""Parity of the Triton AdaLN LayerNorm (and its DiT gated-residual variant) against a float64
PyTorch reference: forward and every gradient, fp32 and fp16 (bf16 on CUDA only), the awkward
shapes, every optional argument, autocast, the torch.library registration and bad input."""
from __future__ import annotations

import pytest
import torch

import uvit_fast  # noqa: F401  (registers the torch.library ops)
from uvit_fast.ops import (
    adaln_layer_norm,
    adaln_layer_norm_reference,
    residual_adaln_layer_norm,
    residual_adaln_layer_norm_reference,
)
from uvit_fast.testing import assert_parity

FP = [torch.float32, torch.float16]
BF16_CUDA = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="bf16 arithmetic/rounding is wrong in the Triton CPU interpreter; bf16 is proven on a GPU",
    ),
)


def _mod(kind, B, L, D, dtype, device):
    """A modulation tensor: None, per sample (B, D), per token (B, L, D), or a broadcast form."""
    shapes = {
        None: None,
        "sample": (B, D),
        "token": (B, L, D),
        "bsample": (1, D),          # one row for the whole batch
        "btoken": (1, L, D),        # per token, shared over the batch
        "sample3": (B, 1, D),       # per sample written as (B, 1, D)
    }
    shape = shapes[kind]
    if shape is None:
        return None
    return (0.5 * torch.randn(*shape, device=device)).to(dtype)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]


def _check_all(outs, base_outs, ref_outs, inputs, base_inputs, ref_inputs, names, grads):
    """Forward outputs and the gradient of every present input, against float64."""
    for i, (o, bo, ro) in enumerate(zip(outs, base_outs, ref_outs)):
        assert o.dtype == bo.dtype, f"output {i}: dtype {o.dtype} != PyTorch's {bo.dtype}"
        assert_parity(o, bo, ro, name=f"output {i}")
    present = [k for k, t in enumerate(inputs) if t is not None]
    g = torch.autograd.grad(outs, [inputs[k] for k in present], [gr.to(o.dtype) for gr, o in zip(grads, outs)])
    bg = torch.autograd.grad(
        base_outs, [base_inputs[k] for k in present], [gr.to(o.dtype) for gr, o in zip(grads, base_outs)]
    )
    rg = torch.autograd.grad(ref_outs, [ref_inputs[k] for k in present], [gr.double() for gr in grads])
    for k, a, b, r in zip(present, g, bg, rg):
        assert a.dtype == inputs[k].dtype, f"d{names[k]}: dtype {a.dtype} != input dtype {inputs[k].dtype}"
        assert_parity(a, b, r, name=f"d{names[k]}")


def _run_adaln(shape, dtype, device, shift, scale, affine, eps, scale_offset, x_fn=None):
    B, L, D = shape if len(shape) == 3 else (1, 1, shape[-1])
    x = torch.randn(*shape, device=device).to(dtype)
    if x_fn is not None:
        x = x_fn(x)
    sh, sc = _mod(shift, B, L, D, dtype, device), _mod(scale, B, L, D, dtype, device)
    w = (1 + 0.5 * torch.randn(D, device=device)).to(dtype) if affine in ("w", "wb") else None
    b = (0.5 * torch.randn(D, device=device)).to(dtype) if affine == "wb" else None
    names = ["x", "shift", "scale", "weight", "bias"]
    raw = [x, sh, sc, w, b]
    ins, base, ref = _leaves(*raw), _leaves(*raw), _leaves(*[t.double() if t is not None else None for t in raw])
    out = adaln_layer_norm(*ins, eps=eps, scale_offset=scale_offset, backend="triton")
    bout = adaln_layer_norm_reference(*base, eps=eps, scale_offset=scale_offset)
    rout = adaln_layer_norm_reference(*ref, eps=eps, scale_offset=scale_offset)
    gy = torch.randn(out.shape, device=device)
    _check_all([out], [bout], [rout], ins, base, ref, names, [gy])


# (shape, shift, scale, affine, eps, scale_offset): every optional argument on and off, D in
# {77, 203 (odd), 64 (no tail), 1152}, rows not a multiple of anything, batch 1.
ADALN_CASES = [
    ((2, 37, 77), "sample", "sample", None, 1e-6, 1.0),      # DiT modulate
    ((2, 19, 203), "token", "token", "wb", 1e-5, 0.0),       # U-ViT paper AdaLN, per token, affine
    ((1, 13, 1152), "sample", "sample", None, 1e-6, 1.0),    # batch 1, DiT-XL width
    ((3, 7, 64), "bsample", "sample3", "w", 1e-5, 1.0),      # broadcast batch, (B, 1, D), weight only
    ((2, 11, 77), "btoken", None, "wb", 1e-6, 0.0),          # shift only, per token shared over batch
    ((2, 11, 203), None, "token", None, 1e-5, 0.0),          # scale only, per token
    ((2, 11, 77), None, "bsample", "wb", 1e-5, 1.0),         # scale only, broadcast
    ((3, 5, 203), None, None, "wb", 1e-5, 1.0),              # plain affine LayerNorm (3-D)
    ((2, 9, 77), None, None, None, 1e-6, 1.0),               # plain non-affine LayerNorm
]


@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize("case", ADALN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_adaln_parity(case, dtype, device):
    shape, shift, scale, affine, eps, off = case
    _run_adaln(shape, dtype, device, shift, scale, affine, eps, off)


@pytest.mark.parametrize("dtype", [torch.float16, BF16_CUDA])
@pytest.mark.slow
def test_adaln_parity_cuda_dtypes(dtype, device):
    # fp16 here too so the same shapes run on CPU; bf16 needs a GPU (see BF16_CUDA)
    _run_adaln((2, 37, 1152), dtype, device, "sample", "sample", "wb", 1e-6, 1.0)
    _run_adaln((2, 19, 203), dtype, device, "token", "token", None, 1e-5, 0.0)


@pytest.mark.parametrize(
    "shape,x_fn",
    [
        ((77,), None),                                            # 1-D
        ((25, 77), None),                                         # 2-D rows
        ((2, 3, 5, 203), None),                                   # 4-D
        ((7, 77), lambda x: x.t().contiguous().t()),              # column-major rows (feature stride != 1)
        ((4, 2, 77), lambda x: x.transpose(0, 1)),                # non-contiguous 3-D
    ],
    ids=["1d", "2d", "4d", "colmajor", "transposed"],
)
def test_plain_layer_norm_any_shape(shape, x_fn, device):
    _run_adaln(shape, torch.float32, device, None, None, "wb", 1e-5, 1.0, x_fn=x_fn)


def test_strided_modulation_from_chunk(device):
    """DiT's chunk(6) of the adaLN linear output: (B, D) views with row stride 6*D, no copies."""
    B, L, D = 2, 9, 77
    mod = torch.randn(B, 6 * D, device=device, requires_grad=True)
    mod64 = mod.detach().double().requires_grad_(True)
    x = torch.randn(B, L, D, device=device)
    br = torch.randn(B, L, D, device=device)

    def f(m, xx, bb, **kw):
        sh, sc, g = m.chunk(6, dim=1)[:3]
        x_new, h = residual_adaln_layer_norm(xx, bb, g, sh, sc, eps=1e-6, **kw)
        return x_new, h

    x_new, h = f(mod, x, br, backend="triton")
    bx, bh = f(mod, x, br, backend="torch")
    rx, rh = f(mod64, x.double(), br.double(), backend="torch")
    assert_parity(x_new, bx, rx, name="x_new")
    assert_parity(h, bh, rh, name="h")
    gy = torch.randn_like(h)
    (g,) = torch.autograd.grad((x_new, h), mod, (gy, gy))
    (bg,) = torch.autograd.grad((bx, bh), mod, (gy, gy))
    (rg,) = torch.autograd.grad((rx, rh), mod64, (gy.double(), gy.double()))
    assert_parity(g, bg, rg, name="dmod")


def _run_residual(shape, dtype, device, gate, shift, scale, affine, eps, off, use_x_new=True):
    B, L, D = shape
    x = torch.randn(*shape, device=device).to(dtype)
    br = torch.randn(*shape, device=device).to(dtype)
    g = _mod(gate, B, L, D, dtype, device)
    sh, sc = _mod(shift, B, L, D, dtype, device), _mod(scale, B, L, D, dtype, device)
    w = (1 + 0.5 * torch.randn(D, device=device)).to(dtype) if affine in ("w", "wb") else None
    b = (0.5 * torch.randn(D, device=device)).to(dtype) if affine == "wb" else None
    names = ["x", "branch", "gate", "shift", "scale", "weight", "bias"]
    raw = [x, br, g, sh, sc, w, b]
    ins, base, ref = _leaves(*raw), _leaves(*raw), _leaves(*[t.double() if t is not None else None for t in raw])
    out = residual_adaln_layer_norm(*ins, eps=eps, scale_offset=off, backend="triton")
    bout = residual_adaln_layer_norm_reference(*base, eps=eps, scale_offset=off)
    rout = residual_adaln_layer_norm_reference(*ref, eps=eps, scale_offset=off)
    sel = slice(0, 2) if use_x_new else slice(1, 2)  # only h: x_new's gradient is absent/zero
    grads = [torch.randn(shape, device=device) for _ in range(2)][sel]
    _check_all(list(out)[sel], list(bout)[sel], list(rout)[sel], ins, base, ref, names, grads)
    if not use_x_new:  # x_new must still be right even when it does not feed the loss
        assert_parity(out[0], bout[0], rout[0], name="x_new")


# (shape, gate, shift, scale, affine, eps, scale_offset, use_x_new)
RESIDUAL_CASES = [
    ((2, 37, 77), "sample", "sample", "sample", None, 1e-6, 1.0, True),     # DiT block
    ((1, 13, 1152), "sample", "sample", "sample", None, 1e-6, 1.0, False),  # batch 1, DiT-XL width, only h
    ((2, 19, 203), "token", "token", "token", "wb", 1e-5, 0.0, True),       # everything per token
    ((2, 11, 77), None, None, None, "wb", 1e-5, 1.0, True),                 # U-ViT: x + branch, then LN
    ((3, 7, 203), "bsample", "btoken", None, "w", 1e-5, 1.0, False),        # broadcast gate, shift only
    ((2, 9, 64), "sample3", None, "bsample", None, 1e-6, 0.0, True),        # (B, 1, D) gate, scale only
    ((2, 9, 77), "btoken", "bsample", "sample3", "wb", 1e-6, 1.0, True),    # broadcast per-token gate
]


@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_residual_parity(case, dtype, device):
    shape, gate, shift, scale, affine, eps, off, use_x_new = case
    _run_residual(shape, dtype, device, gate, shift, scale, affine, eps, off, use_x_new)


@pytest.mark.parametrize("dtype", [torch.float16, BF16_CUDA])
@pytest.mark.slow
def test_residual_parity_cuda_dtypes(dtype, device):
    _run_residual((2, 37, 1152), dtype, device, "sample", "sample", "sample", None, 1e-6, 1.0)
    _run_residual((2, 11, 203), dtype, device, None, None, None, "wb", 1e-5, 1.0)


def test_mixed_dtypes_follow_pytorch_promotion(device):
    """fp16 activations with fp32 modulation / residual: output dtypes as the reference's."""
    B, L, D = 2, 5, 77
    x = torch.randn(B, L, D, device=device, dtype=torch.float16)
    br = torch.randn(B, L, D, device=device, dtype=torch.float16)
    g, sh, sc = (0.5 * torch.randn(B, D, device=device) for _ in range(3))  # fp32
    w = torch.randn(D, device=device)  # fp32 affine with fp16 x (nn.LayerNorm's mixed mode)
    y = adaln_layer_norm(x, sh, sc, w, backend="triton")
    ref = adaln_layer_norm_reference(x, sh, sc, w)
    assert y.dtype == ref.dtype == torch.float32
    assert_parity(y, ref, adaln_layer_norm_reference(x.double(), sh.double(), sc.double(), w.double()))
    x_new, h = residual_adaln_layer_norm(x, br, g, backend="triton")
    rx, rh = residual_adaln_layer_norm_reference(x, br, g)
    assert (x_new.dtype, h.dtype) == (rx.dtype, rh.dtype) == (torch.float32, torch.float32)
    r64 = residual_adaln_layer_norm_reference(x.double(), br.double(), g.double())
    assert_parity(x_new, rx, r64[0], name="x_new")
    assert_parity(h, rh, r64[1], name="h")


@pytest.mark.parametrize("gate", [None, "sample"])
def test_residual_fp16_x_fp32_branch_gradients(gate, device):
    """x fp16 with an fp32 branch: x_new is fp32, so dbranch must keep fp32 accuracy (it is not
    dx rounded to x's fp16), with and without a gate."""
    B, L, D = 2, 9, 77
    x = torch.randn(B, L, D, device=device).half()
    br = torch.randn(B, L, D, device=device)
    g = _mod(gate, B, L, D, torch.float32, device)
    names = ["x", "branch", "gate"]
    raw = [x, br, g]
    ins, base, ref = _leaves(*raw), _leaves(*raw), _leaves(*[t.double() if t is not None else None for t in raw])
    out = residual_adaln_layer_norm(*ins, backend="triton")
    bout = residual_adaln_layer_norm_reference(*base)
    rout = residual_adaln_layer_norm_reference(*ref)
    grads = [torch.randn(B, L, D, device=device) for _ in range(2)]
    _check_all(list(out), list(bout), list(rout), ins, base, ref, names, grads)


def test_autocast_matches_reference(device):
    """Under autocast the output dtype is the reference's: float32 on CUDA (autocast runs
    layer_norm in fp32), x's dtype on CPU (CPU autocast leaves layer_norm alone); gradients come
    back in each input's dtype."""
    B, L, D = 2, 9, 77
    ac_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    x, br = (torch.randn(B, L, D, device=device, dtype=torch.float16, requires_grad=True) for _ in range(2))
    g, sh, sc = (torch.randn(B, D, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3))
    w = torch.randn(D, device=device, requires_grad=True)  # fp32 parameter, as under AMP
    ins = [x, br, g, sh, sc, w]
    with torch.autocast(device.type, dtype=ac_dtype):
        y = adaln_layer_norm(x, sh, sc, w, backend="triton")
        ref_y = adaln_layer_norm_reference(x, sh, sc, w)
        x_new, h = residual_adaln_layer_norm(x, br, g, sh, sc, w, backend="triton")
        ref_x_new, ref_h = residual_adaln_layer_norm_reference(x, br, g, sh, sc, w)
    if device.type == "cuda":
        assert ref_y.dtype == torch.float32  # the behaviour we document
    assert y.dtype == ref_y.dtype and h.dtype == ref_h.dtype and x_new.dtype == ref_x_new.dtype
    r64 = [t.detach().double().requires_grad_(True) for t in ins]
    ry = adaln_layer_norm_reference(r64[0], r64[3], r64[4], r64[5])
    rx, rh = residual_adaln_layer_norm_reference(*r64)
    assert_parity(y, ref_y, ry, name="y")
    assert_parity(x_new, ref_x_new, rx, name="x_new")
    assert_parity(h, ref_h, rh, name="h")
    gy = torch.randn(B, L, D, device=device)
    grads = torch.autograd.grad((y, x_new, h), ins, [gy.to(t.dtype) for t in (y, x_new, h)])
    bgrads = torch.autograd.grad(
        (ref_y, ref_x_new, ref_h), ins, [gy.to(t.dtype) for t in (ref_y, ref_x_new, ref_h)]
    )
    rgrads = torch.autograd.grad((ry, rx, rh), r64, [gy.double()] * 3)
    for name, t, a, b, r in zip(["x", "branch", "gate", "shift", "scale", "weight"], ins, grads, bgrads, rgrads):
        assert a.dtype == t.dtype
        assert_parity(a, b, r, name=f"d{name}")


def test_empty_rows(device):
    x = torch.randn(0, 77, device=device, requires_grad=True)
    w = torch.randn(77, device=device, requires_grad=True)
    y = adaln_layer_norm(x, weight=w, backend="triton")
    assert y.shape == (0, 77)
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    assert dx.shape == (0, 77) and torch.equal(dw, torch.zeros_like(w))


def test_float64_runs_pytorch_under_auto(device):
    """The kernels compute in fp32: float64 must not be silently computed at fp32 accuracy.
    Under "auto" (here with the process-wide default set to Triton, as on CUDA) it runs the
    PyTorch reference; an explicit backend="triton" is a TypeError."""
    B, L, D = 2, 5, 77
    x, br = torch.randn(B, L, D, device=device), torch.randn(B, L, D, device=device)
    g, sh, sc = (torch.randn(B, D, device=device) for _ in range(3))
    x64, sh64 = x.double(), sh.double()
    with uvit_fast.use_backend("triton"):
        y = adaln_layer_norm(x64, sh64, sc)  # fp64 x, fp32 scale
        x_new, h = residual_adaln_layer_norm(x, br, g, sh64)  # fp64 shift only
    ref_y = adaln_layer_norm_reference(x64, sh64, sc)
    ref_x_new, ref_h = residual_adaln_layer_norm_reference(x, br, g, sh64)
    assert y.dtype == h.dtype == torch.float64
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_new, ref_x_new, rtol=0, atol=0)
    torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="adaln_layer_norm: the Triton kernel supports .* got torch.float64"):
        adaln_layer_norm(x64, backend="triton")
    with pytest.raises(TypeError, match="residual_adaln_layer_norm: the Triton kernel supports .* got torch.float64"):
        residual_adaln_layer_norm(x, br, g.double(), backend="triton")


def _opcheck_args(device):
    B, L, D = 2, 5, 33
    x, br = torch.randn(B, L, D, device=device), torch.randn(B, L, D, device=device)
    g, sh = torch.randn(B, D, device=device), torch.randn(B, D, device=device)
    sc = torch.randn(B, L, D, device=device)
    w, b = torch.randn(D, device=device), torch.randn(D, device=device)
    return x, br, g, sh, sc, w, b


def test_opcheck_forward_ops(device):
    x, br, g, sh, sc, w, b = _opcheck_args(device)
    req = [t.requires_grad_(True) for t in (x, br, g, sh, sc, w, b)]
    x, br, g, sh, sc, w, b = req
    torch.library.opcheck(
        torch.ops.uvit_fast.adaln_layer_norm.default, (x, sh, sc, w, b, 1e-5, 1.0, torch.float32)
    )
    torch.library.opcheck(
        torch.ops.uvit_fast.adaln_layer_norm.default, (x, None, None, None, None, 1e-6, 0.0, torch.float32)
    )
    torch.library.opcheck(
        torch.ops.uvit_fast.residual_adaln_layer_norm.default, (x, br, g, sh, sc, w, b, 1e-6, 1.0, torch.float32)
    )
    torch.library.opcheck(
        torch.ops.uvit_fast.residual_adaln_layer_norm.default,
        (x, br, None, None, None, w, None, 1e-5, 1.0, torch.float32),
    )


@pytest.mark.slow
def test_opcheck_backward_ops(device):
    x, br, g, sh, sc, w, b = _opcheck_args(device)
    _, mean, rstd = torch.ops.uvit_fast.adaln_layer_norm(x, sh, sc, w, b, 1e-5, 1.0, torch.float32)
    dy = torch.randn_like(x)
    torch.library.opcheck(
        torch.ops.uvit_fast.adaln_layer_norm_backward.default, (dy, x, sh, sc, w, b, mean, rstd, 1.0)
    )
    x_new, _, mean, rstd = torch.ops.uvit_fast.residual_adaln_layer_norm(
        x, br, g, sh, sc, w, b, 1e-6, 0.0, torch.float32
    )
    torch.library.opcheck(
        torch.ops.uvit_fast.residual_adaln_layer_norm_backward.default,
        (dy, torch.randn_like(x), x_new, br, g, sh, sc, w, b, mean, rstd, 0.0, torch.float32),
    )
    torch.library.opcheck(
        torch.ops.uvit_fast.residual_adaln_layer_norm_backward.default,
        (dy, None, x_new, br, None, None, None, None, None, mean, rstd, 0.0, torch.float32),
    )


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    """A DiT-style block tail (gated residual + modulated LN) and a final LN compile without
    graph breaks, forward and backward, and match the eager Triton path."""
    B, L, D = 2, 9, 40

    # the public functions (validation and backend dispatch included) trace without a graph break

    def block(x, br, mod, w):
        sh, sc, g = mod.chunk(3, dim=1)
        x_new, h = residual_adaln_layer_norm(x, br, g, sh, sc, eps=1e-6, backend="triton")
        return x_new, adaln_layer_norm(h, weight=w, eps=1e-5, backend="triton")

    inputs = [
        torch.randn(B, L, D, device=device),
        torch.randn(B, L, D, device=device),
        torch.randn(B, 3 * D, device=device),
        torch.randn(D, device=device),
    ]
    eager_in = [t.clone().requires_grad_(True) for t in inputs]
    comp_in = [t.clone().requires_grad_(True) for t in inputs]
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    e_out = block(*eager_in)
    c_out = compiled(*comp_in)
    gy = [torch.randn_like(o) for o in e_out]
    e_g = torch.autograd.grad(e_out, eager_in, gy)
    c_g = torch.autograd.grad(c_out, comp_in, gy)
    for a, b in zip(list(c_out) + list(c_g), list(e_out) + list(e_g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_raises(device):
    x = torch.randn(2, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        adaln_layer_norm(x, weight=torch.randn(7, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\) or \(2, 5, 8\)"):
        adaln_layer_norm(x, shift=torch.randn(3, 8, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"scale must have shape .* got \(2, 4, 8\)"):
        adaln_layer_norm(x, scale=torch.randn(2, 4, 8, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"modulation needs x of shape \(B, L, D\)"):
        adaln_layer_norm(x[0], shift=torch.randn(1, 8, device=device), backend="triton")
    with pytest.raises(TypeError, match="x must have a floating dtype; got torch.int64"):
        adaln_layer_norm(torch.ones(2, 5, 8, dtype=torch.long, device=device), backend="triton")
    with pytest.raises(TypeError, match="scale must have a floating dtype"):
        adaln_layer_norm(x, scale=torch.ones(2, 8, dtype=torch.int32, device=device), backend="triton")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        adaln_layer_norm(x, shift=torch.randn(2, 8, device="meta"), backend="triton")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        adaln_layer_norm(x, eps=-1.0, backend="triton")


def test_bad_residual_input_raises(device):
    x = torch.randn(2, 5, 8, device=device)
    with pytest.raises(ValueError, match=r"branch \(2, 5, 7\) must have the shape of x \(2, 5, 8\)"):
        residual_adaln_layer_norm(x, torch.randn(2, 5, 7, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"gate must have shape \(2, 8\) or \(2, 5, 8\)"):
        residual_adaln_layer_norm(x, x.clone(), torch.randn(2, 9, device=device), backend="triton")
    with pytest.raises(TypeError, match="branch must have a floating dtype"):
        residual_adaln_layer_norm(x, torch.ones(2, 5, 8, dtype=torch.long, device=device), backend="triton")
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        residual_adaln_layer_norm(x, x.clone(), torch.randn(2, 8, device="meta"), backend="triton")


@pytest.mark.parametrize("with_gate", [False, True])
def test_residual_keeps_branch_for_backward_only_with_a_gate(with_gate):
    """Without a gate the backward never reads the branch (its gradient is x's), so it is not saved."""
    B, L, D = 1, 77, 72
    x = torch.randn(B, L, D, requires_grad=True)
    branch = torch.randn(B, L, D, requires_grad=True)
    gate = torch.randn(B, D, requires_grad=True) if with_gate else None
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), uvit_fast.use_backend("triton"):
        x_new, h = uvit_fast.ops.residual_adaln_layer_norm(x, branch, gate, None, None, None, None)
    kept_branch = any(t.untyped_storage().data_ptr() == branch.untyped_storage().data_ptr() for t in saved)
    assert kept_branch is with_gate
    (x_new.sum() + (h * h).sum()).backward()
    ref_x, ref_b = x.detach().double().requires_grad_(), branch.detach().double().requires_grad_()
    ref_g = gate.detach().double().requires_grad_() if with_gate else None
    rx, rh = uvit_fast.ops.residual_adaln_layer_norm_reference(ref_x, ref_b, ref_g, None, None, None, None)
    (rx.sum() + (rh * rh).sum()).backward()
    torch.testing.assert_close(branch.grad.double(), ref_b.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-4)
