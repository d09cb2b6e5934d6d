"""FP8 (e4m3) W8A8 linears: the quantize kernel, the GEMM with its epilogues, the backends, the
custom ops, and ``uvit_fast.quantize`` on models.

On CPU the kernels run under the Triton interpreter with NaN-poisoned outputs (tests/conftest.py),
on real ``float8_e4m3fn`` tensors (the interpreter loads them and its dot of two e4m3 tiles is the
exact products summed in fp32). Two interpreter limits shape the tests: its float32-to-e4m3
conversion drops the carry into the exponent (so the kernels round explicitly, and the rounding is
tested bit for bit against PyTorch), and its float32-to-bfloat16 store truncates, so parity runs
with float32 and float16 outputs; bfloat16 outputs need a GPU.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn

import uvit_fast
from uvit_fast import ops
from uvit_fast.ops import fp8 as F8
from uvit_fast.quantization import FP8Linear, QuantizeReport
from uvit_fast.testing import assert_parity, randomize_

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
NEEDS_CUDA_BF16 = pytest.mark.skipif(
    not ON_CUDA, reason="the interpreter's float32-to-bfloat16 store truncates instead of rounding; needs a GPU"
)
OUT_DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=NEEDS_CUDA_BF16)]
E4M3 = torch.float8_e4m3fn


def _bits(t):
    return t.view(torch.uint8)


def _quantized_inputs(M, K, N, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    x[min(1, M - 1)] *= 40  # rows of different ranges: the per-row scales matter
    w = torch.randn(N, K, generator=g) * K ** -0.5
    w[0] *= 0.01  # and output channels of different ranges
    x_q, x_s = F8.quantize_fp8_reference(x)
    w_q, w_s = F8.quantize_fp8_weight(w)
    if lead is not None:
        x_q, x_s = x_q.view(*lead, K), x_s.view(*lead)
    return [t.to(DEVICE) for t in (x_q, x_s, w_q, w_s)]


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------
def _every_rounding_case():
    """Every finite e4m3 value, the midpoints between neighbours (ties), one float32 ulp either side
    of each midpoint, subnormals and the values that round to 0 or to 2**-9, both signs, with 448 in
    the row so that the scale is 1 and the row is quantized as it is."""
    values = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    values = values[torch.isfinite(values)].unique()
    mids = (values[1:] + values[:-1]) / 2
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1e9))
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -11, 1.5 * 2 ** -10, 2.0 ** -12, 1e-30, 0.0, 3 * 2.0 ** -11])
    return torch.cat([values, mids, up, down, tiny, -tiny, torch.tensor([448.0])]).clamp(-448, 448)


def test_quantize_rounds_every_e4m3_case_as_pytorch():
    x = _every_rounding_case().view(1, -1).to(DEVICE)
    q, s = F8.quantize_fp8(x, backend="triton")
    assert s.item() == 1.0
    want = x.to(E4M3)  # PyTorch: round to nearest even
    bad = (_bits(q) != _bits(want)).nonzero()[:, 1]
    assert bad.numel() == 0, f"values {x[0, bad[:8]].tolist()} gave {q.float()[0, bad[:8]].tolist()}, " \
                             f"PyTorch {want.float()[0, bad[:8]].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 258, 72), (77, 1152), (3, 5, 80), (4, 0)], ids=str)
def test_quantize_parity(shape, dtype):
    """The kernel's bits and scales equal the reference's: rows of zeros, rows of different ranges,
    a strided view, K = 0 (bfloat16 inputs only load: no dot, no bfloat16 store)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    if x.numel():
        x.view(-1, shape[-1])[0] = 0  # a row of zeros: the smallest scale, all zeros
        x[..., -1, :] *= 1000  # rows of other ranges
    big = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=dtype)
    big[..., ::2] = x
    x = big[..., ::2]  # a strided view (column stride 2)
    x = x.to(DEVICE)
    q, s = F8.quantize_fp8(x, backend="triton")
    q_ref, s_ref = F8.quantize_fp8_reference(x)
    assert q.shape == x.shape and q.dtype == E4M3 and s.shape == x.shape[:-1] and s.dtype == torch.float32
    assert torch.equal(_bits(q), _bits(q_ref))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)], ids=str)
def test_quantize_concat_parity(dtypes):
    """U-ViT's long-skip input: the rows of [h, skip] quantized without the concat (a float32 skip
    beside bfloat16 h, as under autocast), bit for bit as the reference on torch.cat."""
    g = torch.Generator().manual_seed(7)
    h = (torch.randn(2, 258, 72, generator=g) * 3).to(dtypes[0]).to(DEVICE)
    skip = (torch.randn(2, 258, 72, generator=g) * 5).to(dtypes[1]).to(DEVICE)
    h[0, 3] = 0
    skip[1, 4] *= 100
    q, s = F8.quantize_fp8_concat(h, skip, backend="triton")
    q_ref, s_ref = F8.quantize_fp8_reference(torch.cat([h, skip], dim=-1))
    assert q.shape == (2, 258, 144) and s.shape == (2, 258)
    assert torch.equal(_bits(q), _bits(q_ref)) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match=r"quantize_fp8_concat: h and skip must have the same leading dims"):
        F8.quantize_fp8_concat(h, skip[:, :5])


def test_scales_are_the_smallest_powers_of_two():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-8, 8, 64).unsqueeze(1)
    q, s = F8.quantize_fp8_reference(x)
    m, _ = torch.frexp(s)
    assert torch.all(m == 0.5), "scales are powers of two"
    amax = x.abs().amax(-1)
    assert torch.all(amax / s <= 448) and torch.all(amax / s > 224)
    # the dequantized row is within e4m3's half ulp (2**-4 relative) of x, wherever it is normal
    normal = (x / s.unsqueeze(1)).abs() >= 2 ** -6
    rel = ((F8.dequantize_fp8(q, s) - x).abs() / x.abs())[normal]
    assert rel.max() <= 2 ** -4


def test_weight_scales_per_output_channel():
    w = torch.randn(40, 72) * torch.logspace(-3, 3, 40).unsqueeze(1)
    w_q, w_s = F8.quantize_fp8_weight(w)
    assert w_q.shape == (40, 72) and w_s.shape == (40,)
    torch.testing.assert_close(F8.dequantize_fp8(w_q, w_s), w, rtol=2 ** -4, atol=0)


# ---------------------------------------------------------------------------------------------
# the norms with an FP8 output
# ---------------------------------------------------------------------------------------------
def _norm_inputs(B, L, D, dtype, seed=6):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(*s, generator=g).to(dtype).to(DEVICE) for s in ((B, L, D), (B, L, D), (B, D), (B, D), (B, D))]
    t[0][0, 1] *= 30  # a token of another range
    return t  # x, branch, gate, shift, scale


def _assert_fp8_close(act, y64, name):
    """``act`` (an FP8Activation) against the quantization of the float64 ``y64`` rounded to float32:
    the same scales, the same bits but where the fp32 LayerNorm and float64's differ across an e4m3
    rounding boundary (at most 1 in 1000 elements, and those one e4m3 step apart)."""
    q, s = F8.quantize_fp8_reference(y64.float())
    assert torch.equal(act.scale, s), f"{name}: row scales differ"
    diff = _bits(act.q) != _bits(q)
    assert diff.float().mean() <= 1e-3, f"{name}: {int(diff.sum())} of {diff.numel()} e4m3 values differ"
    step = (act.q.float() - q.float()).abs()[diff]
    assert torch.all(step <= q.float().abs()[diff] * 2 ** -3 + 2 ** -9), f"{name}: more than one e4m3 step apart"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, L, D", [(1, 77, 72), pytest.param(2, 9, 80, marks=pytest.mark.slow),
                                     pytest.param(1, 5, 1152, marks=pytest.mark.slow)])
def test_adaln_fp8_output(B, L, D, dtype):
    """adaln_layer_norm(..., quantize="fp8") and residual_adaln_layer_norm(..., quantize="fp8"): the
    kernel's e4m3 values and row scales from its fp32 result, against float64's quantized (DiT's
    modulation, eps 1e-6; U-ViT's plain affine norm)."""
    x, br, gate, shift, scale = _norm_inputs(B, L, D, dtype)
    w, b = torch.randn(D).to(dtype).to(DEVICE), torch.randn(D).to(dtype).to(DEVICE)
    act = ops.adaln_layer_norm(x, shift, scale, eps=1e-6, backend="triton", quantize="fp8")
    assert isinstance(act, F8.FP8Activation) and act.q.shape == x.shape and act.scale.shape == (B, L)
    assert act.dtype == dtype
    _assert_fp8_close(act, ops.adaln_layer_norm_reference(x.double(), shift.double(), scale.double(), eps=1e-6),
                      "adaln")
    x_new, act = ops.residual_adaln_layer_norm(x, br, None, None, None, w, b, backend="triton", quantize="fp8")
    x_ref, _ = ops.residual_adaln_layer_norm(x, br, None, None, None, w, b, backend="triton")
    assert torch.equal(x_new, x_ref)
    _assert_fp8_close(act, ops.adaln_layer_norm_reference(x_new.double(), None, None, w.double(), b.double()),
                      "residual")
    x_new, act = ops.residual_adaln_layer_norm(x, br, gate, shift, scale, eps=1e-6, backend="triton", quantize="fp8")
    _assert_fp8_close(act, ops.adaln_layer_norm_reference(x_new.double(), shift.double(), scale.double(), eps=1e-6),
                      "gated residual")


def test_adaln_fp8_torch_path_and_errors():
    x, br, gate, shift, scale = _norm_inputs(2, 7, 32, torch.float32)
    act = ops.adaln_layer_norm(x, shift, scale, backend="torch", quantize="fp8")
    q, s = F8.quantize_fp8_reference(ops.adaln_layer_norm_reference(x, shift, scale))
    assert torch.equal(_bits(act.q), _bits(q)) and torch.equal(act.scale, s)
    with pytest.raises(ValueError, match=r"adaln_layer_norm: quantize must be None or 'fp8'; got 'int8'"):
        ops.adaln_layer_norm(x, quantize="int8")
    with pytest.raises(ValueError, match=r"residual_adaln_layer_norm: quantize must be None or 'fp8'"):
        ops.residual_adaln_layer_norm(x, br, quantize="e5m2")
    with pytest.raises(TypeError, match=r"adaln_layer_norm: quantize='fp8' takes float16, bfloat16 or float32 x"):
        ops.adaln_layer_norm(x.double(), quantize="fp8")
    with pytest.raises(ValueError, match=r"residual_adaln_layer_norm: branch \(2, 7, 31\) must have the shape of x"):
        ops.residual_adaln_layer_norm(x, br[..., :31], quantize="fp8")
    with pytest.raises(TypeError, match=r"inference-only .* x requires grad"):
        ops.adaln_layer_norm(x.requires_grad_(True), quantize="fp8")


# ---------------------------------------------------------------------------------------------
# fp8_linear parity (the kernel against float64, beside PyTorch in the same dtype)
# ---------------------------------------------------------------------------------------------
EPILOGUES = {
    "none": dict(),
    "bias": dict(bias=True),
    "gelu": dict(bias=True, activation="gelu"),
    "gelu_tanh": dict(bias=True, activation="gelu_tanh"),
    "silu": dict(activation="silu"),
    "quick_gelu": dict(bias=True, activation="quick_gelu"),
    "residual": dict(bias=True, residual=True),
    "gate_sample+residual": dict(bias=True, gate="sample", residual=True),
    "gate_token": dict(bias=True, activation="gelu_tanh", gate="token"),
}


def _epilogue_args(spec, lead, N, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    if spec.get("bias"):
        out["bias"] = torch.randn(N, generator=g).to(dtype)
    if spec.get("residual"):
        out["residual"] = torch.randn(*lead, N, generator=g).to(dtype)
    if spec.get("gate") == "sample":
        out["gate"] = torch.randn(lead[0], N, generator=g).to(dtype)
    elif spec.get("gate") == "token":
        out["gate"] = torch.randn(*lead, N, generator=g).to(dtype)
    if spec.get("activation"):
        out["activation"] = spec["activation"]
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def _check_linear(lead, K, N, epilogue, out_dtype, seed=0):
    M = 1
    for d in lead:
        M *= d
    x_q, x_s, w_q, w_s = _quantized_inputs(M, K, N, seed=seed, lead=lead)
    kw = _epilogue_args(EPILOGUES[epilogue], lead, N, out_dtype if out_dtype != torch.float32 else torch.float32)
    out = F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=out_dtype, backend="triton", **kw)
    base = F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=out_dtype, backend="torch", **kw)
    ref = F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float64, backend="torch", **kw)
    assert out.dtype == base.dtype == out_dtype and out.shape == (*lead, N)
    assert_parity(out, base, ref, name=f"fp8_linear {epilogue}")
    return out, base, ref


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
def test_linear_every_epilogue(epilogue, out_dtype):
    """Every epilogue at an awkward shape: 2 x 77 rows (one partial row tile), K = 72 (a partial K
    tile), N = 100 (a partial column tile)."""
    _check_linear((2, 77), 72, 100, epilogue, out_dtype)


@pytest.mark.parametrize("rows, K, N, epilogue", [
    pytest.param((1,), 72, 1000, "gate_sample+residual", id="rows1-K72-N1000"),
    pytest.param((3, 129), 72, 1000, "gate_token", id="rows387-K72-N1000", marks=pytest.mark.slow),
    pytest.param((1, 258), 1152, 1000, "gelu_tanh", id="rows258-K1152-N1000", marks=pytest.mark.slow),
    pytest.param((65,), 72, 4608, "residual", id="rows65-K72-N4608", marks=pytest.mark.slow),
    pytest.param((3, 129), 1152, 4608, "residual", id="rows387-K1152-N4608",
                 marks=[pytest.mark.slow, pytest.mark.extended]),
])
def test_linear_issue_shapes(rows, K, N, epilogue):
    """The issue's shapes: rows 1 to 387, K = 72 / 1152, N = 1000 / 4608 (float16 outputs)."""
    _check_linear(rows, K, N, epilogue, torch.float16, seed=5)


@pytest.mark.parametrize("gate", [None, pytest.param("sample", marks=pytest.mark.slow), "token"])
def test_mlp_pair_equals_the_unfused_kernels(gate):
    """fp8_mlp on the kernels (fc1 writes h and its rows' partial maxima; fc2 quantizes h in registers)
    gives the bits of the unfused kernels (fc1, the quantize kernel, fc2): the same h, the same
    row scales, the same e4m3 values, the same GEMM; and the reference's result within the 2x rule
    against float64 on the same quantized h."""
    lead, K, H, N = (2, 77), 72, 200, 100
    x_q, x_s, w1, s1 = _quantized_inputs(154, K, H, lead=lead)
    _, _, w2, s2 = _quantized_inputs(8, H, N, seed=2)
    g = torch.Generator().manual_seed(8)
    b1, b2 = (torch.randn(n, generator=g).half().to(DEVICE) for n in (H, N))
    r = torch.randn(*lead, N, generator=g).half().to(DEVICE)
    gt = {None: None, "sample": torch.randn(2, N, generator=g), "token": torch.randn(*lead, N, generator=g)}[gate]
    gt = None if gt is None else gt.half().to(DEVICE)
    kw = dict(activation="gelu_tanh", residual=r, gate=gt, out_dtype=torch.float16)
    out = F8.fp8_mlp(x_q, x_s, w1, s1, b1, w2, s2, b2, backend="triton", **kw)
    h = F8.fp8_linear(x_q, x_s, w1, s1, b1, activation="gelu_tanh", out_dtype=torch.float16, backend="triton")
    h_q, h_s = F8.quantize_fp8(h, backend="triton")
    unfused = F8.fp8_linear(h_q, h_s, w2, s2, b2, residual=r, gate=gt, out_dtype=torch.float16, backend="triton")
    assert torch.equal(out, unfused)
    base = F8.fp8_linear(h_q, h_s, w2, s2, b2, residual=r, gate=gt, out_dtype=torch.float16, backend="torch")
    ref = F8.fp8_linear(h_q, h_s, w2, s2, b2, residual=r, gate=gt, out_dtype=torch.float64, backend="torch")
    assert_parity(out, base, ref, name="fp8_mlp")
    ref_mlp = F8.fp8_mlp(x_q, x_s, w1, s1, b1, w2, s2, b2, backend="torch", **kw)
    assert _cos(ref_mlp, out) > 0.999


def test_mlp_errors():
    x_q, x_s, w1, s1 = _quantized_inputs(6, 32, 48)
    _, _, w2, s2 = _quantized_inputs(4, 48, 16, seed=2)
    with pytest.raises(ValueError, match=r"fp8_mlp: fc2_w_q must have shape \(N, 48\) for fc1_w_q \(48, 32\)"):
        F8.fp8_mlp(x_q, x_s, w1, s1, None, w2[:, :40], s2, None)
    with pytest.raises(TypeError, match=r"fp8_mlp: fc2_w_q must be torch.float8_e4m3fn"):
        F8.fp8_mlp(x_q, x_s, w1, s1, None, w2.float(), s2, None)
    with pytest.raises(ValueError, match=r"fp8_mlp: fc2_w_scale must be float32 of shape \(16,\)"):
        F8.fp8_mlp(x_q, x_s, w1, s1, None, w2, s2[:3], None)
    with pytest.raises(ValueError, match=r"fp8_mlp: residual must have the output's shape \(6, 16\)"):
        F8.fp8_mlp(x_q, x_s, w1, s1, None, w2, s2, None, residual=torch.zeros(6, 48))
    with pytest.raises(TypeError, match=r"fp8_mlp: backend='triton' keeps h in out_dtype, which must be bfloat16 or float16"):
        F8.fp8_mlp(x_q, x_s, w1, s1, None, w2, s2, None, out_dtype=torch.float32, backend="triton")
    with pytest.raises(ValueError, match=r"amax_out needs a 16-bit out_dtype and no residual or gate"):
        from uvit_fast.kernels import fp8_linear as k
        k.fp8_linear_forward(x_q, x_s, w1, s1, residual=torch.zeros(6, 48), out_dtype=torch.float16, amax_out=True)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_candidate(out_dtype):
    """``torch._scaled_mm`` with the eager epilogue: a PyTorch baseline, not a kernel, so no 2x rule;
    it rounds the GEMM output to ``out_dtype`` before the activation, one rounding more than the
    reference, and stays within 3x the reference's error."""
    x_q, x_s, w_q, w_s = _quantized_inputs(77, 64, 48, lead=(77,))
    kw = _epilogue_args(EPILOGUES["gate_token"], (77,), 48, out_dtype)
    out = F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=out_dtype, backend="scaled_mm", **kw)
    base = F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=out_dtype, backend="torch", **kw)
    ref = F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float64, backend="torch", **kw)
    assert out.dtype == out_dtype
    assert_parity(out, base, ref, factor=3.0, name="scaled_mm")


def test_reference_is_the_dequantized_linear():
    """The spec in float64 equals F.linear on the dequantized operands, epilogue included."""
    x_q, x_s, w_q, w_s = _quantized_inputs(9, 32, 24)
    b, r, g = torch.randn(24).double(), torch.randn(9, 24).double(), torch.randn(9, 24).double()
    out = ops.fp8_linear_reference(x_q, x_s, w_q, w_s, b, activation="silu", residual=r, gate=g,
                                   out_dtype=torch.float64)
    x, w = F8.dequantize_fp8(x_q, x_s, torch.float64), F8.dequantize_fp8(w_q, w_s, torch.float64)
    want = r + g * ops.fused_linear_reference(x, w, b, activation="silu")
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_auto_on_cpu_runs_the_reference():
    x_q, x_s, w_q, w_s = _quantized_inputs(5, 32, 16)
    a = F8.fp8_linear(x_q, x_s, w_q, w_s)
    b = F8.fp8_linear_reference(x_q, x_s, w_q, w_s)
    assert torch.equal(a, b) and a.dtype == torch.bfloat16


def test_flop_count():
    from torch.utils.flop_counter import FlopCounterMode

    x_q, x_s, w_q, w_s = _quantized_inputs(10, 32, 16)
    with FlopCounterMode(display=False) as counter:
        F8.fp8_linear(x_q, x_s, w_q, w_s, backend="triton", out_dtype=torch.float32)
    assert counter.get_total_flops() == 2 * 10 * 32 * 16


# ---------------------------------------------------------------------------------------------
# the custom ops
# ---------------------------------------------------------------------------------------------
def _opcheck_cases():
    x_q, x_s, w_q, w_s = _quantized_inputs(18, 32, 40)
    r = torch.randn(18, 40, device=DEVICE)
    return [
        ("fp8_quantize", lambda: (torch.randn(18, 72, device=DEVICE),)),
        ("fp8_quantize", lambda: (torch.randn(18, 72, device=DEVICE).half(),)),
        ("fp8_quantize", lambda: (torch.randn(18, 72, device=DEVICE).half(), torch.randn(18, 40, device=DEVICE))),
        ("adaln_layer_norm_fp8", lambda: (torch.randn(2, 9, 72, device=DEVICE), None, None, r[:2, :1].expand(2, 72),
                                          torch.randn(2, 72, device=DEVICE), None, None, 1e-6, 1.0)),
        ("adaln_layer_norm_fp8", lambda: (torch.randn(2, 9, 72, device=DEVICE).half(),
                                          torch.randn(2, 9, 72, device=DEVICE).half(), torch.randn(2, 72, device=DEVICE),
                                          None, None, torch.randn(72, device=DEVICE), torch.randn(72, device=DEVICE),
                                          1e-5, 0.0)),
        ("fp8_linear", lambda: (x_q, x_s, w_q, w_s, None, None, None, None, 1, torch.float32)),
        ("fp8_linear", lambda: (x_q, x_s, w_q, w_s, r[0], r, r[:2].half(), "gelu", 9, torch.float32)),
        ("fp8_linear", lambda: (x_q, x_s, w_q, w_s, r[0].half(), r.half(), None, "gelu_tanh", 1, torch.float16)),
        ("fp8_linear_amax", lambda: (x_q, x_s, w_q, w_s, r[0].half(), "gelu", torch.float16)),
        # fc2 after fc1: a 16-bit h (18, 40) with its rows' partial maxima (any positive values here)
        ("fp8_linear_prequant", lambda: (r.half(), r[:, :4].abs() + 1, *_quantized_inputs(4, 40, 24)[2:], None,
                                         torch.randn(18, 24, device=DEVICE), torch.randn(2, 24, device=DEVICE), 9,
                                         torch.float32)),
    ]


def _opcheck_params():
    seen = set()
    for i, (n, args) in enumerate(_opcheck_cases()):
        yield pytest.param(n, args, id=f"{n}-{i}", marks=[pytest.mark.slow] if n in seen else [])
        seen.add(n)


# opcheck's test_schema compares the inputs before and after the call with a multiplication that
# PyTorch's CPU kernels do not implement for float8 ("mul_cpu_reduced_float"): the float8 cases run
# the other three checks, and the test checks what test_schema would (no input is mutated) itself
_NO_SCHEMA = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("name, args", _opcheck_params())
def test_opcheck(name, args):
    a = args()
    fp8_inputs = any(isinstance(t, torch.Tensor) and t.dtype == E4M3 for t in a)
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in a]
    op = getattr(torch.ops.uvit_fast, name).default
    torch.library.opcheck(op, a, test_utils=_NO_SCHEMA if fp8_inputs and not ON_CUDA else
                          ("test_schema", *_NO_SCHEMA))
    op(*a)
    for t, b in zip(a, before):
        if isinstance(t, torch.Tensor):
            assert torch.equal(_bits(t) if t.dtype == E4M3 else t, _bits(b) if b.dtype == E4M3 else b)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_errors():
    x_q, x_s, w_q, w_s = _quantized_inputs(6, 32, 16)
    with pytest.raises(TypeError, match=r"fp8_linear: x_q must be torch.float8_e4m3fn; got torch.bfloat16"):
        F8.fp8_linear(x_q.bfloat16(), x_s, w_q, w_s)
    with pytest.raises(TypeError, match=r"fp8_linear: w_q must be torch.float8_e4m3fn"):
        F8.fp8_linear(x_q, x_s, w_q.float(), w_s)
    with pytest.raises(ValueError, match=r"fp8_linear: w_q must have shape \(N, 32\) for x_q \(6, 32\); got \(16, 31\)"):
        F8.fp8_linear(x_q, x_s, w_q[:, :31], w_s)
    with pytest.raises(ValueError, match=r"fp8_linear: x_scale must be float32 of shape \(6,\).*got torch.float32 \(5,\)"):
        F8.fp8_linear(x_q, x_s[:5], w_q, w_s)
    with pytest.raises(ValueError, match=r"fp8_linear: w_scale must be float32 of shape \(16,\).*torch.float16"):
        F8.fp8_linear(x_q, x_s, w_q, w_s.half())
    with pytest.raises(ValueError, match=r"fp8_linear: bias has shape \(15,\) but w_q \(16, 32\) needs \(16,\)"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, torch.zeros(15))
    with pytest.raises(ValueError, match=r"fp8_linear: residual must have the output's shape \(6, 16\)"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, residual=torch.zeros(6, 15))
    with pytest.raises(ValueError, match=r"fp8_linear: gate must have .*the output's shape \(6, 16\)"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, gate=torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"fp8_linear: activation must be one of"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, activation="relu")
    with pytest.raises(TypeError, match=r"fp8_linear: out_dtype must be"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"backend='triton' writes bfloat16, float16 or float32; got out_dtype=float64"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float64, backend="triton")
    with pytest.raises(ValueError, match=r"backend='scaled_mm' cannot run this call: out_dtype float64"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, out_dtype=torch.float64, backend="scaled_mm")
    with pytest.raises(ValueError, match=r"fp8_linear: backend must be one of"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, backend="cublas")
    with pytest.raises(TypeError, match=r"inference-only \(no autograd\), but residual requires grad"):
        F8.fp8_linear(x_q, x_s, w_q, w_s, residual=torch.zeros(6, 16, requires_grad=True))
    with pytest.raises(TypeError, match=r"quantize_fp8: x must be float16, bfloat16 or float32; got torch.float64"):
        F8.quantize_fp8(torch.zeros(3, 4, dtype=torch.float64), backend="triton")
    with pytest.raises(TypeError, match=r"quantize_fp8: x must have a floating dtype; got torch.int64"):
        F8.quantize_fp8(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"quantize_fp8: the FP8 ops are inference-only .* x requires grad"):
        F8.quantize_fp8(torch.zeros(3, 4, requires_grad=True))


def test_launcher_errors():
    from uvit_fast.kernels import fp8_linear as k

    x_q, x_s, w_q, w_s = _quantized_inputs(6, 32, 16)
    with pytest.raises(TypeError, match=r"x_q must be torch.float8_e4m3fn"):
        k.fp8_linear_forward(x_q.half(), x_s, w_q, w_s)
    with pytest.raises(ValueError, match=r"x_scale must be a float32 tensor of shape \(6,\)"):
        k.fp8_linear_forward(x_q, x_s.double(), w_q, w_s)
    with pytest.raises(ValueError, match=r"gate of shape \(4, 16\) with gate_rows=2 covers 8 rows; the GEMM has M=6"):
        k.fp8_linear_forward(x_q, x_s, w_q, w_s, gate=torch.zeros(4, 16), gate_rows=2)


# ---------------------------------------------------------------------------------------------
# uvit_fast.quantize on models
# ---------------------------------------------------------------------------------------------
def _dit(dtype=torch.bfloat16, depth=3):
    """DiT-S/8 (D 384, 6 heads, 1536 MLP) at 16 px, 3 blocks: the preset's widths, short to run."""
    torch.manual_seed(0)
    m = uvit_fast.create_model("DiT-S/8", input_size=16, depth=depth).eval()
    randomize_(m, std=0.05)
    return m.to(dtype)


def _dit_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 4, 16, 16, generator=g).to(dtype), torch.tensor([10.0, 500.0], dtype=dtype), torch.tensor([1, 3])


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_quantize_dit_report_and_accuracy():
    m = _dit()
    m64 = copy.deepcopy(m).double()
    report = uvit_fast.quantize(m)
    assert isinstance(report, QuantizeReport)
    names = {n for n, _ in m.named_modules()}
    blocks = [n for n in names if n.startswith("blocks.") and n.count(".") == 1]
    want = {f"{b}.{lin}" for b in blocks for lin in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(report.quantized) == want
    assert all(isinstance(m.get_submodule(p), FP8Linear) for p in want)
    kept = dict(report.kept)
    assert "final_layer.linear" in kept and "t_embedder.mlp.0" in kept and "blocks.0.adaLN_modulation.1" in kept
    assert type(m.final_layer.linear) is nn.Linear and m.final_layer.linear.weight.dtype == torch.bfloat16
    assert 0.5 < report.quantized_fraction < 1
    assert f"quantized ({4 * len(m.blocks)} linears" in str(report) and "on CPU" in str(report)
    x, t, y = _dit_inputs(torch.bfloat16)
    with torch.no_grad():
        out = m(x, t, y)
        ref = m64(x.double(), t.double(), y)
    assert out.dtype == torch.bfloat16
    assert _cos(out, ref) > 0.99
    assert uvit_fast.quantize(m).quantized == report.quantized  # again: nothing more


def test_quantize_uvit_with_its_long_skips():
    """This package's U-ViT: block linears and the out-blocks' long-skip linears in FP8
    (FP8SkipLinear: one quantize kernel over [h, skip]); close to float64."""
    from uvit_fast.quantization import FP8SkipLinear

    torch.manual_seed(0)
    m = uvit_fast.create_model("cifar10_uvit_small", img_size=16, depth=5, embed_dim=256, num_heads=4).eval()
    randomize_(m, std=0.05)
    m64 = copy.deepcopy(m).double()
    m = m.to(torch.bfloat16)
    report = uvit_fast.quantize(m)
    skips = [p for p in report.quantized if p.endswith("skip_linear")]
    assert len(skips) == len(m.out_blocks) and all(type(m.get_submodule(p)) is FP8SkipLinear for p in skips)
    x, t = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([3.0, 700.0], dtype=torch.float64)
    with torch.no_grad():
        ref = m64(x, t)
        out = m(x.bfloat16(), t.bfloat16())
    assert out.dtype == torch.bfloat16 and _cos(out, ref) > 0.99


def test_fp8_blocks_fuse_their_epilogues(monkeypatch):
    """A quantized block runs its MLP as one fp8_mlp call (fc1's activation; fc2's input quantized in
    fc2; the gate and residual in fc2's epilogue) on the norm kernel's FP8 output, and qkv on the
    other norm's (DiT: gelu_tanh, the per-sample adaLN gate)."""
    from uvit_fast import quantization

    m = _dit()
    uvit_fast.quantize(m)
    linears, mlps = [], []
    real_linear, real_mlp = quantization.fp8_linear, quantization.fp8_mlp

    def spy_linear(x_q, x_scale, w_q, w_scale, bias=None, **kw):
        linears.append(tuple(w_q.shape))
        return real_linear(x_q, x_scale, w_q, w_scale, bias, **kw)

    def spy_mlp(x_q, x_scale, w1, s1, b1, w2, s2, b2, **kw):
        mlps.append((tuple(w1.shape), tuple(w2.shape), kw.get("activation"), kw.get("residual") is not None,
                     None if kw.get("gate") is None else tuple(kw["gate"].shape)))
        return real_mlp(x_q, x_scale, w1, s1, b1, w2, s2, b2, **kw)

    monkeypatch.setattr(quantization, "fp8_linear", spy_linear)
    monkeypatch.setattr(quantization, "fp8_mlp", spy_mlp)
    x, t, y = _dit_inputs(torch.bfloat16)
    with torch.no_grad():
        m(x, t, y)
    D, H = 384, 1536
    n = len(m.blocks)
    assert mlps == [((H, D), (D, H), "gelu_tanh", True, (2, D))] * n
    assert linears.count((3 * D, D)) == n and linears.count((D, D)) == n and len(linears) == 2 * n


def test_state_dict_round_trip_and_float_checkpoints():
    m = _dit()
    plain = copy.deepcopy(m)
    uvit_fast.quantize(m)
    sd = m.state_dict()
    assert sd["blocks.0.mlp.fc1.weight"].dtype == E4M3 and sd["blocks.0.mlp.fc1.weight_scale"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = _dit()
    uvit_fast.quantize(m2)
    randomize_(m2, std=0.3, seed=9)  # other float parameters; the float8 buffers are not parameters
    m2.load_state_dict(torch.load(buf), strict=True)
    assert all(torch.equal(_bits(a) if a.dtype == E4M3 else a, _bits(b) if b.dtype == E4M3 else b)
               for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    # a float (upstream-layout) checkpoint into a quantized model: quantized as it loads
    m3 = _dit()
    uvit_fast.quantize(m3)
    m3.load_state_dict(plain.state_dict(), strict=True)
    x, t, y = _dit_inputs(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m3(x, t, y), m(x, t, y))
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks.0.mlp.fc1.weight"):
        m3.load_state_dict({**plain.state_dict(), "blocks.0.mlp.fc1.weight": torch.zeros(3, 3)})


def test_quantize_refuses_gpus_without_fp8(monkeypatch):
    from uvit_fast import quantization

    m = _dit()
    monkeypatch.setattr(quantization, "_model_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    report = uvit_fast.quantize(m)
    assert report.quantized == [] and report.quantized_fraction == 0
    assert "compute capability 8.0: no FP8 tensor cores" in str(report)
    assert not any(isinstance(mod, FP8Linear) for mod in m.modules())


def test_quantize_argument_errors():
    with pytest.raises(ValueError, match=r"quantize: mode must be one of \('fp8',\); got 'int8'"):
        uvit_fast.quantize(nn.Linear(4, 4), "int8")
    with pytest.raises(TypeError, match=r"quantize: model must be an nn.Module; got dict"):
        uvit_fast.quantize({}, "fp8")
    m = _dit()
    uvit_fast.quantize(m)
    x, t, y = _dit_inputs(torch.bfloat16)
    x.requires_grad_(True)
    with pytest.raises(TypeError, match=r"inference-only"):
        m(x, t, y)


def test_quantize_skip_patterns_and_small_linears():
    m = _dit()
    report = uvit_fast.quantize(m, skip=["blocks.0.*", "*.attn.qkv"])
    assert not any(p.startswith("blocks.0.") or p.endswith("attn.qkv") for p in report.quantized)
    assert dict(report.kept)["blocks.1.attn.qkv"] == "matches skip"
    tiny = nn.Sequential(nn.ModuleList([nn.Linear(64, 64)]))
    rep = uvit_fast.quantize(tiny)
    assert rep.quantized == [] and "below 128" in dict(rep.kept)["0.0"]


def test_quantize_upstream_dit_and_uvit():
    """Upstream-layout modules (tests/upstream_modules.py, as the DiT and U-ViT repositories write
    them), plain and optimize()d: the block linears become FP8, outputs stay close to float64."""
    from upstream_modules import DiT as UpDiT, UViT as UpUViT

    torch.manual_seed(0)
    cases = [
        (UpDiT(input_size=16, patch_size=8, in_channels=4, hidden_size=128, depth=2, num_heads=4, num_classes=10),
         lambda d: (torch.randn(2, 4, 16, 16, dtype=d), torch.tensor([3.0, 700.0], dtype=d), torch.tensor([1, 2]))),
        (UpUViT(img_size=16, patch_size=4, in_chans=3, embed_dim=128, depth=3, num_heads=4),
         lambda d: (torch.randn(2, 3, 16, 16, dtype=d), torch.tensor([3.0, 700.0], dtype=d))),
    ]
    for model, make in cases:
        for optimized in (False, True):
            m = copy.deepcopy(model).eval()
            randomize_(m, std=0.05)
            if optimized:
                uvit_fast.optimize(m)
            m64 = copy.deepcopy(m).double()
            m = m.to(torch.bfloat16)
            report = uvit_fast.quantize(m)
            assert report.quantized and all(isinstance(m.get_submodule(p), FP8Linear) for p in report.quantized)
            torch.manual_seed(1)
            args = make(torch.float64)
            with torch.no_grad():
                ref = m64(*args)
                out = m(*(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args))
            assert _cos(out, ref) > 0.99, (type(model).__name__, optimized)


@pytest.mark.slow  # every op of a 2-block DiT-S/8 under the interpreter
def test_quantized_model_on_the_kernels():
    """A quantized DiT in float16 with every op on the Triton kernels (interpreter on CPU), beside the
    same quantized model on PyTorch, both against the unquantized float64 model: the FP8 kernels ran
    (recorded), and the kernels' model is as accurate as PyTorch's (relative RMS error within 1.2x).
    The two are not compared element by element: an input differing in its last bit can move an
    activation across an e4m3 rounding boundary (a 1/16 relative step), which the next layers carry."""
    from uvit_fast.testing import CustomOpRecorder

    m = _dit(torch.float16, depth=2)
    m64 = copy.deepcopy(m).double()
    uvit_fast.quantize(m)
    x, t, y = _dit_inputs(torch.float16)
    with torch.no_grad():
        ref = m64(x.double(), t.double(), y)
        with uvit_fast.use_backend("torch"):
            base = m(x, t, y)
        with uvit_fast.use_backend("triton"), CustomOpRecorder() as rec:
            out = m(x, t, y)
    # the norms write qkv's and fc1's inputs in FP8, the quantize kernel proj's; fc2 quantizes its own
    assert {"uvit_fast.fp8_linear.default", "uvit_fast.fp8_quantize.default", "uvit_fast.adaln_layer_norm_fp8.default",
            "uvit_fast.fp8_linear_amax.default", "uvit_fast.fp8_linear_prequant.default"} <= rec.ops

    def rel(a):
        return ((a.double() - ref).norm() / ref.norm()).item()

    assert torch.isfinite(out).all()
    assert rel(out) <= 1.2 * rel(base), (rel(out), rel(base))
    assert _cos(out, ref) > 0.99


@pytest.mark.skipif(ON_CUDA, reason="checks the refusal without a GPU")
def test_gpu_bench_script_refuses_without_cuda(tmp_path):
    """scripts/gpu_bench_fp8.py (a step of scripts/gpu_check.sh) exits 2 without a CUDA device, and
    gpu_check.sh runs it."""
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    main = runpy.run_path(str(root / "scripts" / "gpu_bench_fp8.py"))["main"]
    assert main(["--out", str(tmp_path / "fp8.jsonl")]) == 2
    assert "scripts/gpu_bench_fp8.py --out" in (root / "scripts" / "gpu_check.sh").read_text()
