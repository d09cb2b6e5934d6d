"""patchify / unpatchify (exact data movement), the fused patchify + embed and the fused
decoder + unpatchify Triton kernels (forward and every gradient) against float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

from uvit_fast.ops import (
    decoder_unpatchify,
    decoder_unpatchify_reference,
    patchify,
    patchify_embed,
    patchify_embed_reference,
    unpatchify,
)
from uvit_fast.testing import assert_parity

IS_CUDA = torch.cuda.is_available()
BF16_SKIP = pytest.mark.skipif(
    not IS_CUDA, reason="bf16 tl.dot is wrong in the Triton CPU interpreter (triton issue 11584); bf16 runs on CUDA"
)
FLOAT_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=BF16_SKIP)]


# =========================================================================== data movement
def _rearrange_ref(x, p1, p2):
    """'B C (h p1) (w p2) -> B (h w) (p1 p2 C)' written out index by index."""
    B, C, H, W = x.shape
    h, w = H // p1, W // p2
    out = torch.empty(B, h * w, p1 * p2 * C, dtype=x.dtype)
    for hh in range(h):
        for ww in range(w):
            for i in range(p1):
                for j in range(p2):
                    f = (i * p2 + j) * C
                    out[:, hh * w + ww, f:f + C] = x[:, :, hh * p1 + i, ww * p2 + j]
    return out


@pytest.mark.parametrize("p", [1, 2, 4, 8])
@pytest.mark.parametrize("C", [3, 4])
@pytest.mark.parametrize("grid", [(3, 3), (2, 5)], ids=["square", "nonsquare"])
def test_patchify_roundtrip_exact(p, C, grid):
    H, W = grid[0] * p, grid[1] * p
    x = torch.randn(2, C, H, W)
    t = patchify(x, p)
    assert torch.equal(t, _rearrange_ref(x, p, p))
    back = unpatchify(t, p, C, grid=None if grid[0] == grid[1] else grid)
    assert torch.equal(back, x)
    t2 = torch.randn_like(t)
    assert torch.equal(patchify(unpatchify(t2, p, C, grid=grid), p), t2)


def test_patchify_rectangular_patch_and_video_roundtrip():
    x = torch.randn(2, 3, 8, 12)
    t = patchify(x, (4, 2))
    assert torch.equal(t, _rearrange_ref(x, 4, 2))
    assert torch.equal(unpatchify(t, (4, 2), 3, grid=(2, 6)), x)
    v = torch.randn(2, 3, 4, 6, 8)  # 'B C (T t) (h p1) (w p2) -> B (T h w) (t p1 p2 C)'
    tv = patchify(v, (2, 3, 4))
    ref = v.reshape(2, 3, 2, 2, 2, 3, 2, 4).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(2, 8, 72)
    assert torch.equal(tv, ref)
    assert torch.equal(unpatchify(tv, (2, 3, 4), 3, grid=(2, 2, 2)), v)


def test_patch_token_order_matches_conv_weight():
    """Token features are (p1 p2 C) while the conv weight is (C p1 p2): the conv is
    patchify(x) @ weight.permute(0, 2, 3, 1).reshape(D, -1).T, exactly in float64."""
    x = torch.randn(2, 4, 6, 10, dtype=torch.float64)
    w = torch.randn(7, 4, 2, 2, dtype=torch.float64)
    conv = F.conv2d(x, w, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify(x, 2) @ w.permute(0, 2, 3, 1).reshape(7, -1).T, conv)


# =========================================================================== parity helpers
def _grads_check(fn_ours, fn_ref, inputs, grad_names, dtype_out_check=True, name=""):
    """Run ours and plain PyTorch in the given dtypes and a float64 copy of the reference;
    compare the output and the gradients of ``grad_names``."""
    def leafs(cast64):
        d = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.detach().double() if cast64 else v.detach().clone()
                v.requires_grad_(k in grad_names)
            d[k] = v
        return d

    ours_in, base_in, ref_in = leafs(False), leafs(False), leafs(True)
    out = fn_ours(**ours_in)
    base = fn_ref(**base_in)
    ref = fn_ref(**ref_in)
    if dtype_out_check:
        assert out.dtype == base.dtype, f"{name}: output dtype {out.dtype} != reference chain's {base.dtype}"
    assert_parity(out, base, ref, name=f"{name} out")
    if not grad_names:
        return
    g = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    go = torch.autograd.grad(out, [ours_in[n] for n in grad_names], g.to(out.dtype))
    gb = torch.autograd.grad(base, [base_in[n] for n in grad_names], g.to(base.dtype))
    gr = torch.autograd.grad(ref, [ref_in[n] for n in grad_names], g)
    for n, a, b, r in zip(grad_names, go, gb, gr):
        assert a.dtype == b.dtype, f"{name} d{n}: dtype {a.dtype} != {b.dtype}"
        assert_parity(a, b, r, name=f"{name} d{n}")


def _embed_inputs(device, dtype, B, C, spatial, patch, D, E, *, prefix_batch=None, pos_batch=1,
                  bias=True, pos=True, aux_dtype=None):
    aux_dtype = aux_dtype or dtype
    L = math.prod(s // p for s, p in zip(spatial, patch))
    return dict(
        x=torch.randn(B, C, *spatial, device=device, dtype=dtype),
        weight=torch.randn(D, C, *patch, device=device, dtype=dtype) / math.sqrt(C * math.prod(patch)),
        bias=torch.randn(D, device=device, dtype=dtype) if bias else None,
        prefix=torch.randn(prefix_batch or B, E, D, device=device, dtype=aux_dtype) if E else None,
        pos_embed=torch.randn(pos_batch, E + L, D, device=device, dtype=aux_dtype) if pos else None,
    )


def _embed_ours(x, weight, bias, prefix, pos_embed):
    return patchify_embed(x, weight, bias, prefix=prefix, pos_embed=pos_embed, backend="triton")


def _embed_ref(x, weight, bias, prefix, pos_embed):
    return patchify_embed_reference(x, weight, bias, prefix=prefix, pos_embed=pos_embed)


def _all(inputs):
    return [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]


# =========================================================================== patchify_embed
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("extras", [0, 1, 2])
def test_embed_parity(device, dtype, extras):
    # non-square image, D = 40 (tails in every tile), K = 16, prefix batch B, pos batch 1
    inp = _embed_inputs(device, dtype, 2, 4, (6, 10), (2, 2), 40, extras)
    _grads_check(_embed_ours, _embed_ref, inp, _all(inp), name=f"embed E={extras}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embed_parity_78_extras(device, dtype):
    # U-ViT-T2I: time + 77 context tokens; tiny image and width to stay in budget. K = 12.
    inp = _embed_inputs(device, dtype, 2, 3, (4, 4), (2, 2), 24, 78, prefix_batch=2, pos_batch=1)
    _grads_check(_embed_ours, _embed_ref, inp, _all(inp), name="embed E=78")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.slow
def test_embed_parity_large_k(device, dtype):
    # ViT-B/16-like K = 3*16*16 = 768 (many K blocks), batch 1, class token broadcast
    inp = _embed_inputs(device, dtype, 1, 3, (16, 32), (16, 16), 24, 1, prefix_batch=1)
    _grads_check(_embed_ours, _embed_ref, inp, _all(inp), name="embed K=768")


@pytest.mark.parametrize("p,C", [(1, 3), (4, 3), (8, 4)])
def test_embed_parity_patch_sizes(device, p, C):
    # K = 3 (one masked block), 48 (a block and a tail), 256; broadcast prefix, per-sample pos
    inp = _embed_inputs(device, torch.float32, 2, C, (2 * p, 3 * p), (p, p), 20, 2,
                        prefix_batch=1, pos_batch=2)
    _grads_check(_embed_ours, _embed_ref, inp, _all(inp), name=f"embed p={p}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embed_parity_video(device, dtype):
    # Conv3d-shaped weight, tubelet (2, 2, 2), grid (2, 2, 3)
    inp = _embed_inputs(device, dtype, 2, 3, (4, 4, 6), (2, 2, 2), 20, 1)
    _grads_check(_embed_ours, _embed_ref, inp, _all(inp), name="embed video")


def test_embed_no_bias_prefix_pos_and_partial_grads(device):
    inp = _embed_inputs(device, torch.float32, 1, 4, (4, 6), (2, 2), 36, 0, bias=False, pos=False)
    _grads_check(_embed_ours, _embed_ref, inp, ["x", "weight"], name="embed bare")
    # frozen weight, trainable bias only (a different code path for dbias)
    inp = _embed_inputs(device, torch.float32, 2, 4, (4, 6), (2, 2), 36, 1)
    _grads_check(_embed_ours, _embed_ref, inp, ["bias", "prefix"], name="embed bias only")


def test_embed_strided_inputs(device):
    """channels_last image, a non-contiguous weight view, an expanded prefix and a strided
    pos_embed view: the kernel reads the strides instead of copying."""
    B, C, D, E = 2, 4, 24, 2
    x = torch.randn(B, C, 4, 8, device=device).to(memory_format=torch.channels_last)
    weight = torch.randn(C, D, 2, 2, device=device).transpose(0, 1)  # (D, C, 2, 2), strided
    prefix = torch.randn(1, E, D, device=device).expand(B, E, D)
    pos = torch.randn(1, E + 8, 2 * D, device=device)[:, :, ::2]
    assert not weight.is_contiguous() and not pos.is_contiguous()
    ours = patchify_embed(x, weight, None, prefix=prefix, pos_embed=pos, backend="triton")
    ref = patchify_embed_reference(x.double(), weight.double(), None, prefix=prefix.double(), pos_embed=pos.double())
    assert_parity(ours, _embed_ref(x, weight, None, prefix, pos), ref, name="strided embed")


def test_embed_mixed_dtypes_promote(device):
    """fp16 conv, fp32 prefix/pos_embed: the chain's cat/add promote to fp32; so does ours."""
    inp = _embed_inputs(device, torch.float16, 2, 4, (4, 6), (2, 2), 24, 2, aux_dtype=torch.float32)
    _grads_check(_embed_ours, _embed_ref, inp, _all(inp), name="embed mixed")


def test_embed_autocast_matches_reference(device):
    """Under autocast the conv runs in fp16 and cat/add promote against the fp32 prefix and
    pos_embed: the result is fp32 in both, and fp32 parameters get fp32 gradients."""
    inp = _embed_inputs(device, torch.float32, 2, 4, (4, 6), (2, 2), 24, 2)
    names = _all(inp)
    with torch.autocast(device.type, dtype=torch.float16):
        ours_in = {k: v.clone().requires_grad_() for k, v in inp.items()}
        base_in = {k: v.clone().requires_grad_() for k, v in inp.items()}
        out = _embed_ours(**ours_in)
        base = _embed_ref(**base_in)
    assert out.dtype == base.dtype == torch.float32
    # float64 reference of what autocast computes: conv operands rounded to fp16 first
    ref_in = {k: (v.half() if k in ("x", "weight", "bias") else v).double().requires_grad_() for k, v in inp.items()}
    ref = _embed_ref(**ref_in)
    assert_parity(out, base, ref, name="autocast embed out")
    g = torch.randn(ref.shape, dtype=torch.float64, device=device)
    go = torch.autograd.grad(out, [ours_in[n] for n in names], g.float())
    gb = torch.autograd.grad(base, [base_in[n] for n in names], g.float())
    gr = torch.autograd.grad(ref, [ref_in[n] for n in names], g)
    for n, a, b, r in zip(names, go, gb, gr):
        assert a.dtype == b.dtype == torch.float32, n
        assert_parity(a, b, r, name=f"autocast embed d{n}")


# =========================================================================== decoder_unpatchify
def _decoder_inputs(device, dtype, B, C, grid, patch, D, E, *, bias=True):
    P = math.prod(patch)
    return dict(
        tokens=torch.randn(B, E + math.prod(grid), D, device=device, dtype=dtype),
        weight=torch.randn(P * C, D, device=device, dtype=dtype) / math.sqrt(D),
        bias=torch.randn(P * C, device=device, dtype=dtype) if bias else None,
    )


def _decoder_fns(patch, grid, extras):
    def ours(tokens, weight, bias):
        return decoder_unpatchify(tokens, weight, bias, patch_size=patch, grid=grid, extras=extras,
                                  backend="triton")

    def ref(tokens, weight, bias):
        return decoder_unpatchify_reference(tokens, weight, bias, patch_size=patch, grid=grid, extras=extras)

    return ours, ref


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("extras", [0, 1, 2])
def test_decoder_parity(device, dtype, extras):
    # non-square grid (3, 5), p = 2, C = 4 (16 features), D = 40
    inp = _decoder_inputs(device, dtype, 2, 4, (3, 5), (2, 2), 40, extras)
    ours, ref = _decoder_fns(2, (3, 5), extras)
    _grads_check(ours, ref, inp, _all(inp), name=f"decoder E={extras}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decoder_parity_78_extras(device, dtype):
    inp = _decoder_inputs(device, dtype, 2, 3, (2, 2), (2, 2), 24, 78)
    ours, ref = _decoder_fns(2, None, 78)  # square grid inferred
    _grads_check(ours, ref, inp, _all(inp), name="decoder E=78")


@pytest.mark.parametrize("p,C", [(1, 4), (4, 3), (8, 8)])
def test_decoder_parity_patch_sizes(device, p, C):
    # 4, 48 and 512 output features (DiT-XL/8 with learn_sigma): one masked block to many
    inp = _decoder_inputs(device, torch.float32, 1, C, (2, 3), (p, p), 24, 1)
    ours, ref = _decoder_fns(p, (2, 3), 1)
    _grads_check(ours, ref, inp, _all(inp), name=f"decoder p={p}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decoder_parity_video(device, dtype):
    inp = _decoder_inputs(device, dtype, 2, 3, (2, 2, 3), (2, 2, 2), 20, 1)
    ours, ref = _decoder_fns((2, 2, 2), (2, 2, 3), 1)
    _grads_check(ours, ref, inp, _all(inp), name="decoder video")


def test_decoder_no_bias_partial_grads_and_strides(device):
    inp = _decoder_inputs(device, torch.float32, 2, 4, (2, 3), (2, 2), 24, 2, bias=False)
    ours, ref = _decoder_fns(2, (2, 3), 2)
    _grads_check(ours, ref, inp, ["tokens"], name="decoder tokens only")
    inp = _decoder_inputs(device, torch.float32, 2, 4, (2, 3), (2, 2), 24, 2)
    _grads_check(ours, ref, inp, ["bias"], name="decoder bias only")
    # strided tokens (every other feature of a wider tensor) and a transposed weight view
    tokens = torch.randn(2, 8, 48, device=device)[:, :, ::2]
    weight = torch.randn(24, 16, device=device).T
    out = decoder_unpatchify(tokens, weight, None, patch_size=2, grid=(2, 3), extras=2, backend="triton")
    r64 = decoder_unpatchify_reference(tokens.double(), weight.double(), None, patch_size=2, grid=(2, 3), extras=2)
    base = decoder_unpatchify_reference(tokens, weight, None, patch_size=2, grid=(2, 3), extras=2)
    assert out.is_contiguous()
    assert_parity(out, base, r64, name="strided decoder")


def test_decoder_autocast_matches_reference(device):
    inp = _decoder_inputs(device, torch.float32, 2, 4, (2, 3), (2, 2), 24, 2)
    ours, ref_fn = _decoder_fns(2, (2, 3), 2)
    names = _all(inp)
    with torch.autocast(device.type, dtype=torch.float16):
        ours_in = {k: v.clone().requires_grad_() for k, v in inp.items()}
        base_in = {k: v.clone().requires_grad_() for k, v in inp.items()}
        out = ours(**ours_in)
        base = ref_fn(**base_in)
    assert out.dtype == base.dtype == torch.float16
    ref_in = {k: v.half().double().requires_grad_() for k, v in inp.items()}
    ref = ref_fn(**ref_in)
    assert_parity(out, base, ref, name="autocast decoder out")
    g = torch.randn(ref.shape, dtype=torch.float64, device=device)
    go = torch.autograd.grad(out, [ours_in[n] for n in names], g.half())
    gb = torch.autograd.grad(base, [base_in[n] for n in names], g.half())
    gr = torch.autograd.grad(ref, [ref_in[n] for n in names], g.half().double())
    for n, a, b, r in zip(names, go, gb, gr):
        assert a.dtype == b.dtype == torch.float32, n
        assert_parity(a, b, r, name=f"autocast decoder d{n}")


# =========================================================================== registration
def test_opcheck_all_ops(device):
    x = torch.randn(2, 3, 4, 6, device=device, requires_grad=True)
    w = torch.randn(20, 3, 2, 2, device=device, requires_grad=True)
    b = torch.randn(20, device=device, requires_grad=True)
    pre = torch.randn(1, 2, 20, device=device, requires_grad=True)
    pos = torch.randn(1, 8, 20, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.uvit_fast.patchify_embed.default, (x, w, b, pre, pos))
    torch.library.opcheck(torch.ops.uvit_fast.patchify_embed.default, (x, w, None, None, None))
    g = torch.randn(2, 8, 20, device=device)
    torch.library.opcheck(torch.ops.uvit_fast.patchify_embed_backward.default,
                          (g, x.detach(), w.detach(), 2, True, True, True))
    tok = torch.randn(2, 7, 20, device=device, requires_grad=True)
    wd = torch.randn(12, 20, device=device, requires_grad=True)
    bd = torch.randn(12, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.uvit_fast.decoder_unpatchify.default, (tok, wd, bd, [2, 2], [2, 3], 1))
    gi = torch.randn(2, 3, 4, 6, device=device)
    torch.library.opcheck(torch.ops.uvit_fast.decoder_unpatchify_backward.default,
                          (gi, tok.detach(), wd.detach(), [2, 2], [2, 3], 1, True, True, False))


def test_compile_fullgraph_embed_and_decoder(device, monkeypatch):
    import uvit_fast.kernels.decoder_unpatchify as kd
    import uvit_fast.kernels.patchify_embed as ke

    calls = []
    for mod, name in [(ke, "patchify_embed_forward"), (ke, "patchify_embed_backward"),
                      (kd, "decoder_unpatchify_forward"), (kd, "decoder_unpatchify_backward")]:
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1])
    torch._dynamo.reset()
    inp = _embed_inputs(device, torch.float32, 2, 4, (4, 6), (2, 2), 24, 1)
    dec = _decoder_inputs(device, torch.float32, 2, 4, (2, 3), (2, 2), 24, 1)

    def model(x, weight, bias, prefix, pos_embed, dw, db, backend):
        h = patchify_embed(x, weight, bias, prefix=prefix, pos_embed=pos_embed, backend=backend)
        return decoder_unpatchify(h, dw, db, patch_size=2, grid=(2, 3), extras=1, backend=backend)

    args = [t.clone().requires_grad_() for t in (*inp.values(), dec["weight"], dec["bias"])]
    ref_args = [t.clone().requires_grad_() for t in args]
    out = torch.compile(model, fullgraph=True)(*args, "triton")
    ref = model(*ref_args, "torch")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref, ref_args, g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    # the compiled graph ran our kernels, forward and backward, not the PyTorch chain
    assert set(calls) == {"patchify_embed_forward", "patchify_embed_backward",
                          "decoder_unpatchify_forward", "decoder_unpatchify_backward"}, calls


# =========================================================================== errors
def test_embed_errors(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(16, 3, 2, 2, device=device)
    with pytest.raises(ValueError, match=r"W=7 is not divisible by the patch size 2"):
        patchify_embed(torch.randn(2, 3, 8, 7, device=device), w, backend="triton")
    with pytest.raises(ValueError, match=r"x has 4 channels but weight \(16, 3, 2, 2\) expects 3"):
        patchify_embed(torch.randn(2, 4, 8, 8, device=device), w, backend="triton")
    with pytest.raises(ValueError, match=r"prefix must have shape \(2 or 1, E, 16\); got \(2, 1, 8\)"):
        patchify_embed(x, w, prefix=torch.randn(2, 1, 8, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"prefix must have shape .* got \(3, 1, 16\)"):
        patchify_embed(x, w, prefix=torch.randn(3, 1, 16, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"pos_embed must have shape \(1 or 2, 17, 16\) for 1 prefix tokens and 16"):
        patchify_embed(x, w, prefix=torch.randn(1, 1, 16, device=device),
                       pos_embed=torch.randn(1, 16, 16, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"bias has shape \(8,\)"):
        patchify_embed(x, w, torch.randn(8, device=device), backend="triton")
    with pytest.raises(ValueError, match=r"weight must have 4 dims"):
        patchify_embed(x, torch.randn(16, 3, 2, 2, 2, device=device), backend="triton")
    with pytest.raises(TypeError, match=r"x, weight must share one dtype; got x torch.float16, weight torch.float32"):
        patchify_embed(x.half(), w, backend="triton")
    with pytest.raises(TypeError, match=r"Triton kernel supports float16, bfloat16 and float32; got x torch.float64"):
        patchify_embed(x.double(), w.double(), backend="triton")
    # "auto" sends float64 to the PyTorch path instead
    out = patchify_embed(x.double(), w.double(), backend="auto")
    assert out.dtype == torch.float64


def test_decoder_errors(device):
    tok = torch.randn(2, 17, 24, device=device)
    w = torch.randn(16, 24, device=device)
    with pytest.raises(ValueError, match=r"weight \(16, 20\) does not match tokens width 24"):
        decoder_unpatchify(tok, torch.randn(16, 20, device=device), patch_size=2, extras=1, backend="triton")
    with pytest.raises(ValueError, match=r"grid \(3, 4\) has 12 cells but there are 16 patch tokens"):
        decoder_unpatchify(tok, w, patch_size=2, grid=(3, 4), extras=1, backend="triton")
    with pytest.raises(ValueError, match=r"15 patch tokens do not form a square grid"):
        decoder_unpatchify(tok, w, patch_size=2, extras=2, backend="triton")
    with pytest.raises(ValueError, match=r"extras=17 leaves no patch tokens"):
        decoder_unpatchify(tok, w, patch_size=2, extras=17, backend="triton")
    with pytest.raises(ValueError, match=r"extras must be a non-negative int"):
        decoder_unpatchify(tok, w, patch_size=2, extras=-1, backend="triton")
    with pytest.raises(ValueError, match=r"weight has 18 output features, not a multiple of the patch volume 4"):
        decoder_unpatchify(tok, torch.randn(18, 24, device=device), patch_size=2, extras=1, backend="triton")
    with pytest.raises(ValueError, match=r"grid is required for 3-D"):
        decoder_unpatchify(tok, torch.randn(24, 24, device=device), patch_size=(1, 2, 2), extras=1,
                           backend="triton")
    with pytest.raises(TypeError, match=r"tokens, weight must share one dtype; got tokens torch.float16"):
        decoder_unpatchify(tok.half(), w, patch_size=2, extras=1, backend="triton")
    with pytest.raises(ValueError, match=r"patchify: input H=7 is not divisible"):
        patchify(torch.randn(1, 3, 7, 8), 2)
    with pytest.raises(ValueError, match=r"unpatchify: tokens have last dim 12 but patch \(2, 2\) x channels 4"):
        unpatchify(torch.randn(1, 4, 12), 2, 4)
