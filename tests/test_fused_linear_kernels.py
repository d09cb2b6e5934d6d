"""kernels/fused_linear.py: every launcher against float64, under the 2x rule.

On CPU the kernels run under the Triton interpreter (tests/conftest.py) with outputs NaN-poisoned
(UVIT_FAST_POISON=1). The interpreter pins 32x32x32 tiles, so M = 1, 77, 258, N = 40/48/1000 and
K = 72/1000/1152 leave partial row, column and K tiles. The baseline of the 2x rule is plain
PyTorch in the same dtype (F.linear, then the activation, gate and residual as eager runs them).
bf16 is not tested here: the interpreter's bf16 ``tl.dot`` is wrong (triton issue 11584).
"""
import pytest
import torch
import torch.nn.functional as F

from uvit_fast.kernels import fused_linear as k
from uvit_fast.testing import assert_parity

ON_CUDA = torch.cuda.is_available()
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
# the many-case quick tests keep fp32 in the quick subset; their fp16 repeats run in the full suite
DTYPES_FP16_SLOW = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16", marks=pytest.mark.slow)]
ACTS = [pytest.param(a, id=str(a)) for a in k.ACTIVATIONS]


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py


def act_torch(z, activation):
    if activation is None:
        return z
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    assert activation == "quick_gelu"
    return z * torch.sigmoid(1.702 * z)


def forward_reference(x, w, b, activation, residual, gate, gate_rows, dtype):
    """Eager in ``dtype``: F.linear, activation, gate, residual, each rounded as eager rounds it."""
    x, w = x.to(dtype), w.to(dtype)
    z = F.linear(x, w, None if b is None else b.to(dtype))
    y = act_torch(z, activation)
    if gate is not None:
        y = y * gate.to(dtype).repeat_interleave(gate_rows, 0)
    if residual is not None:
        y = residual.to(dtype) + y
    return y, z


def _data(M, K, N, dtype, device, G=None):
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)
    b = torch.randn(N, device=device, dtype=dtype)
    res = torch.randn(M, N, device=device, dtype=dtype)
    gate = torch.randn(G if G is not None else M, N, device=device, dtype=dtype)
    return x, w, b, res, gate


def check_forward(x, w, b=None, *, activation=None, residual=None, gate=None, gate_rows=1, store_preact=True,
                  **kw):
    out, pre = k.fused_linear_forward(x, w, b, activation=activation, residual=residual, gate=gate,
                                      gate_rows=gate_rows, store_preact=store_preact, **kw)
    base, zb = forward_reference(x, w, b, activation, residual, gate, gate_rows, x.dtype)
    ref, z64 = forward_reference(x, w, b, activation, residual, gate, gate_rows, torch.float64)
    assert out.dtype == x.dtype and out.shape == base.shape and out.is_contiguous()
    assert_parity(out, base, ref, name=f"out ({activation})")
    if store_preact:
        assert_parity(pre, zb, z64, name="preact")
    else:
        assert pre.shape == (0,)
    return out, pre


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("activation", ACTS)
def test_forward_every_activation_with_bias_gate_residual(activation, dtype, device):
    """M = 77 (CLIP's tokens: a partial row tile), K = 72 (a partial K tile), N = 40; a per-sample
    gate (7 samples of 11 tokens) and a residual."""
    x, w, b, res, gate = _data(77, 72, 40, dtype, device, G=7)
    check_forward(x, w, b, activation=activation, residual=res, gate=gate, gate_rows=11)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize(
    "bias, residual, gate",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True), (True, True, False)],
    ids=["bare", "bias", "residual", "gate", "bias+residual"],
)
def test_forward_epilogue_subsets(bias, residual, gate, dtype, device):
    x, w, b, res, g = _data(33, 72, 48, dtype, device)  # per-token gate (G = M, gate_rows = 1)
    for activation in (None, "gelu"):
        check_forward(x, w, b if bias else None, activation=activation, residual=res if residual else None,
                      gate=g if gate else None, gate_rows=1, store_preact=activation is not None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_batch_one_and_258_tokens(dtype, device):
    """M = 1 (one token) and M = 258 (U-ViT's tokens, batch 2 x 129 with a per-sample gate)."""
    x, w, b, res, gate = _data(1, 72, 40, dtype, device, G=1)
    check_forward(x, w, b, activation="gelu", residual=res, gate=gate, gate_rows=1)
    x, w, b, res, gate = _data(258, 72, 40, dtype, device, G=2)
    check_forward(x, w, b, activation="gelu_tanh", residual=res, gate=gate, gate_rows=129)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("activation", [pytest.param(None, id="none"), pytest.param("gelu", id="gelu")])
def test_forward_tma_path_under_the_interpreter(activation, dtype, device):
    """The descriptor (TMA) code path, forced on: tails of M and N come from the descriptors' zero
    padding and clipped stores instead of masks."""
    x, w, b, res, gate = _data(77, 72, 40, dtype, device, G=7)
    check_forward(x, w, b, activation=activation, residual=res, gate=gate, gate_rows=11, _use_tma=True)
    check_forward(x, w, b, activation=activation, store_preact=False, _use_tma=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1000, 1152])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_forward_long_k(K, tma, dtype, device):
    """K = 1000 (a partial last K tile after 31 full ones) and 1152 (U-ViT-H's width), N = 1000."""
    x, w, b, res, gate = _data(5, K, 1000, dtype, device, G=1)
    check_forward(x, w, b, activation="gelu", residual=res, gate=gate, gate_rows=5, _use_tma=tma)


@pytest.mark.slow
def test_forward_n4608(device):
    """fc1's width at U-ViT-H (N = 4D = 4608, 144 column tiles) in fp16, with CLIP's 77 tokens."""
    x, w, b, res, _ = _data(77, 72, 4608, torch.float16, device)
    check_forward(x, w, b, activation="gelu", residual=res)


def test_forward_strided_views(device):
    """Operands read in place through strides: a column slice of a wider x, a column-major weight,
    every other bias element, a residual and a gate that are column slices (DiT's gate is a chunk
    of the (B, 6D) modulation)."""
    M, K, N, B = 30, 72, 40, 3
    x = torch.randn(M, 3 * K, device=device)[:, K:2 * K]
    w = (torch.randn(K, N, device=device) * K ** -0.5).t()
    b = torch.randn(2 * N, device=device)[::2]
    res = torch.randn(M, 2 * N, device=device)[:, N:]
    gate = torch.randn(B, 6 * N, device=device)[:, 2 * N:3 * N]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or res.is_contiguous())
    assert not gate.is_contiguous()
    check_forward(x, w, b, activation="silu", residual=res, gate=gate, gate_rows=M // B)
    # x transposed (column stride M): no flattening copy is made
    xt = torch.randn(K, M, device=device).t()
    check_forward(xt, w, b, activation="quick_gelu")


def test_forward_persistent_programs_cover_every_tile(device, monkeypatch):
    """Fewer persistent programs than tiles (1, 2 and 3 programs for 12 tiles): each tile is still
    written exactly once (the output is NaN-poisoned before launch)."""
    x, w, b, res, _ = _data(70, 40, 100, torch.float32, device)
    for programs in (1, 2, 3):
        monkeypatch.setattr(k, "INTERPRET_PROGRAMS", programs)
        check_forward(x, w, b, activation="gelu", residual=res)


def test_forward_degenerate_shapes(device):
    x, w, b, res, _ = _data(0, 72, 40, torch.float32, device)
    out, pre = k.fused_linear_forward(x, w, b, store_preact=True)
    assert out.shape == (0, 40) and pre.shape == (0, 40)
    # K = 0: out = act(bias) (+ residual), no GEMM
    x = torch.randn(4, 0, device=device)
    w = torch.randn(8, 0, device=device)
    b = torch.randn(8, device=device)
    res = torch.randn(4, 8, device=device)
    out, pre = k.fused_linear_forward(x, w, b, activation="gelu", residual=res, store_preact=True)
    torch.testing.assert_close(out, res + F.gelu(b).expand(4, 8))
    torch.testing.assert_close(pre, b.expand(4, 8))


def test_use_tma_decision(monkeypatch):
    """Descriptors on sm_90 only, and only when every 2-D operand has a unit column stride and
    16-byte aligned rows; pointers on sm_80 and for strided views."""
    x = torch.randn(64, 72, dtype=torch.float16)
    w = torch.randn(40, 72, dtype=torch.float16)
    out = torch.empty(64, 40, dtype=torch.float16)
    monkeypatch.setattr(k, "_capability", lambda t: (9, 0))
    assert k.use_tma(x, w, out)
    assert k.use_tma(x, w, out, torch.randn(64, 40, dtype=torch.float16))
    assert not k.use_tma(x.t().contiguous().t(), w, out)  # column stride 64
    assert not k.use_tma(torch.randn(64, 73, dtype=torch.float16)[:, :72], w, out)  # row of 146 B
    assert not k.use_tma(x, w, torch.empty(64, 7, dtype=torch.float16))  # output rows of 14 B
    assert not k.use_tma(x, w, out, torch.randn(64, 80, dtype=torch.float16)[:, 1:41])  # misaligned base
    monkeypatch.setattr(k, "_capability", lambda t: (8, 0))
    assert not k.use_tma(x, w, out)
    monkeypatch.setattr(k, "_capability", lambda t: None)
    assert not k.use_tma(x, w, out)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


def _act_grad_reference(z, activation, upstream):
    """``upstream * act'(z)`` by autograd of the plain activation in z's dtype."""
    zl = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act_torch(zl, activation), zl, upstream)
    return g


def _input_grad_reference(grad, w, gate, gate_rows, act_input, preact_input, dtype):
    g = grad.to(dtype)
    if gate is not None:
        g = g * gate.to(dtype).repeat_interleave(gate_rows, 0)
    dx = g @ w.to(dtype)
    if act_input is not None:
        dx = _act_grad_reference(preact_input.to(dtype), act_input, dx)
    return dx


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("act_input", ACTS)
def test_backward_input_gate_and_activation_derivative(act_input, dtype, device):
    """fc2's input gradient with DiT's gate in the prologue and act'(fc1's pre-activation) in the
    epilogue: M = 77 rows (7 x 11), N = 40 (the reduction: a partial step), K = 72 outputs."""
    M, N, K = 77, 40, 72
    grad = torch.randn(M, N, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * N ** -0.5).to(dtype)
    gate = torch.randn(7, N, device=device, dtype=dtype)
    z = torch.randn(M, K, device=device, dtype=dtype)
    for g, rows in ((gate, 11), (None, 1)):
        dx = k.fused_linear_backward_input(grad, w, gate=g, gate_rows=rows, act_input=act_input,
                                           preact_input=z if act_input else None)
        assert dx.dtype == dtype and dx.shape == (M, K)
        base = _input_grad_reference(grad, w, g, rows, act_input, z, dtype)
        ref = _input_grad_reference(grad, w, g, rows, act_input, z, torch.float64)
        assert_parity(dx, base, ref, name=f"dx ({act_input}, gate={g is not None})")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_input_long_reduction(dtype, device):
    """fc2's input gradient at U-ViT-H widths, few rows: reduction over N = 1152, K = 1000 outputs."""
    M, N, K = 3, 1152, 1000
    grad = torch.randn(M, N, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * N ** -0.5).to(dtype)
    z = torch.randn(M, K, device=device, dtype=dtype)
    dx = k.fused_linear_backward_input(grad, w, act_input="gelu", preact_input=z)
    assert_parity(dx, _input_grad_reference(grad, w, None, 1, "gelu", z, dtype),
                  _input_grad_reference(grad, w, None, 1, "gelu", z, torch.float64), name="dx")


def _weight_grad_reference(grad, x, gate, gate_rows, dtype):
    g = grad.to(dtype)
    if gate is not None:
        g = g * gate.to(dtype).repeat_interleave(gate_rows, 0)
    return g.t() @ x.to(dtype), g.sum(0)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gate"])
def test_backward_weight_and_bias(gated, splits, dtype, device):
    """dW = (grad * gate)^T x over M = 77 rows split in 1 or 3 parts (26-row parts: partial steps
    inside each), with dbias fused; without the bias gradient dbias is an empty tensor."""
    M, N, K = 77, 40, 72
    grad = torch.randn(M, N, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    gate = torch.randn(7, N, device=device, dtype=dtype) if gated else None
    dw, db = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=11, splits=splits)
    assert dw.dtype == dtype and dw.shape == (N, K) and db.shape == (N,)
    (bw, bb), (rw, rb) = (_weight_grad_reference(grad, x, gate, 11, d) for d in (dtype, torch.float64))
    assert_parity(dw, bw, rw, name=f"dW splits={splits}")
    assert_parity(db, bb, rb, name=f"dbias splits={splits}")
    dw2, db2 = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=11, compute_bias=False, splits=splits)
    assert db2.shape == (0,)
    assert_parity(dw2, bw, rw, name="dW without dbias")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_weight_258_tokens_long_k(dtype, device):
    """M = 258 rows (2 x 129, per-sample gate), K = 1000 columns, N = 48, split in 5 parts."""
    M, N, K = 258, 48, 1000
    grad = torch.randn(M, N, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    gate = torch.randn(2, N, device=device, dtype=dtype)
    dw, db = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=129, splits=5)
    (bw, bb), (rw, rb) = (_weight_grad_reference(grad, x, gate, 129, d) for d in (dtype, torch.float64))
    assert_parity(dw, bw, rw, name="dW")
    assert_parity(db, bb, rb, name="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_tma_paths_under_the_interpreter(dtype, device):
    """The backward GEMMs' descriptor (TMA) path, forced on: the input gradient with a gate and
    GELU' (grad tiles [BM, BK], weight tiles [BK, BN]); the weight gradient with a gate and dbias over
    M = 300 rows split in 2 parts (the first a whole number of steps: 256 rows; grad tiles read
    transposed; rows past M from the zero padding)."""
    M, N, K = 300, 40, 72
    grad = torch.randn(M, N, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) * N ** -0.5).to(dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    gate = torch.randn(3, N, device=device, dtype=dtype)
    z = torch.randn(M, K, device=device, dtype=dtype)
    dx = k.fused_linear_backward_input(grad, w, gate=gate, gate_rows=100, act_input="gelu", preact_input=z,
                                       _use_tma=True)
    assert_parity(dx, _input_grad_reference(grad, w, gate, 100, "gelu", z, dtype),
                  _input_grad_reference(grad, w, gate, 100, "gelu", z, torch.float64), name="dx (TMA)")
    for splits in (1, 2):
        dw, db = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=100, splits=splits, _use_tma=True)
        (bw, bb), (rw, rb) = (_weight_grad_reference(grad, x, gate, 100, d) for d in (dtype, torch.float64))
        assert_parity(dw, bw, rw, name=f"dW (TMA, splits={splits})")
        assert_parity(db, bb, rb, name=f"dbias (TMA, splits={splits})")


def test_backward_weight_is_deterministic(device):
    grad = torch.randn(77, 40, device=device)
    x = torch.randn(77, 72, device=device)
    gate = torch.randn(7, 40, device=device)
    first = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=11, splits=3)
    again = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=11, splits=3)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_backward_weight_degenerate(device):
    grad = torch.randn(0, 8, device=device)
    dw, db = k.fused_linear_backward_weight(grad, torch.randn(0, 5, device=device))
    assert torch.equal(dw, torch.zeros(8, 5)) and torch.equal(db, torch.zeros(8))


def test_weight_grad_split_count():
    """The split count depends on the shapes and the SM count only."""
    # U-ViT-H/2 at batch 256 on an H100 (132 SMs): fc1's dW (4608 x 1152) is 324 tiles -> 2 parts;
    # qkv/proj (1152 x 1152, 81 tiles) -> 7 parts
    assert k.weight_grad_splits(256 * 258, 4608, 1152, 132) == 2
    assert k.weight_grad_splits(256 * 258, 1152, 1152, 132) == 7
    assert k.weight_grad_splits(2 * 258, 1152, 1152, 132) == 1  # each part needs >= 1024 rows
    assert k.weight_grad_splits(1 << 20, 64, 64, 132) == k.MAX_SPLITS


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("activation", ACTS)
def test_backward_gate(activation, dtype, device):
    """dgate[g] = sum of grad * act(preact) over g's rows: per sample (2 x 26 rows: a partial row
    block), per token (gate_rows = 1); N = 140: a partial column block."""
    M, N = 52, 140
    grad = torch.randn(M, N, device=device, dtype=dtype)
    z = torch.randn(M, N, device=device, dtype=dtype)
    for G, rows in ((2, 26), (M, 1)):
        dg = k.fused_linear_backward_gate(grad, z, activation=activation, gate_rows=rows, num_gates=G)
        assert dg.dtype == dtype and dg.shape == (G, N)
        base, ref = ((grad.to(d) * act_torch(z.to(d), activation)).view(G, rows, N).sum(1)
                     for d in (dtype, torch.float64))
        assert_parity(dg, base, ref, name=f"dgate ({activation}, rows={rows})")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # sigmoid(-large) = 0 (numpy)
@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("activation", ACTS)
def test_activation_backward(activation, dtype, device):
    M, N = 19, 300
    grad = torch.randn(M, N, device=device, dtype=dtype)
    z = torch.randn(M, 2 * N, device=device, dtype=dtype)[:, ::2] * 3  # strided, wide range
    dx = k.activation_backward(grad, z, activation)
    assert dx.dtype == dtype and dx.shape == (M, N) and dx.is_contiguous()
    base = _act_grad_reference(z, activation, grad)
    ref = _act_grad_reference(z.double(), activation, grad.double())
    assert_parity(dx, base, ref, name=f"act' ({activation})")


# ------------------------------------------------------------------------------------------------
# mixed dtypes: a 16-bit linear with a float32 residual stream (bf16/fp16 autocast training)
# ------------------------------------------------------------------------------------------------
F16, F32 = torch.float16, torch.float32
GATE_DTYPES = [pytest.param(F32, id="gate-fp32"), pytest.param(F16, id="gate-fp16"), pytest.param(None, id="no-gate")]


def mixed_forward_reference(x, w, b, activation, residual, gate, gate_rows, wide):
    """Eager: the linear and its activation in x's dtype (a 16-bit y), then ``residual + gate * y`` in
    the promoted dtype; ``wide`` (float64) runs everything in float64 instead."""
    lin = wide or x.dtype
    y = act_torch(F.linear(x.to(lin), w.to(lin), None if b is None else b.to(lin)), activation)
    if gate is not None:
        y = gate.to(wide or gate.dtype).repeat_interleave(gate_rows, 0) * y
    if residual is not None:
        y = residual.to(wide or residual.dtype) + y
    return y


@pytest.mark.parametrize("gate_dtype", GATE_DTYPES)
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_forward_float32_residual_stream(gate_dtype, tma, device):
    """fp16 x and weight with a float32 residual and a float32 / fp16 / no per-sample gate (77 rows =
    7 x 11): the residual and gate are read in their own dtypes, the output is float32 (promote, as
    eager), y rounded to fp16 before the gate; the pre-activation stays fp16."""
    x, w, b, _, _ = _data(77, 72, 40, F16, device)
    res = torch.randn(77, 40, device=device)
    gate = None if gate_dtype is None else torch.randn(7, 40, device=device, dtype=gate_dtype)
    for activation in ("gelu", None):
        out, pre = k.fused_linear_forward(x, w, b, activation=activation, residual=res, gate=gate, gate_rows=11,
                                          store_preact=True, _use_tma=tma)
        base = mixed_forward_reference(x, w, b, activation, res, gate, 11, None)
        ref = mixed_forward_reference(x, w, b, activation, res, gate, 11, torch.float64)
        assert out.dtype == base.dtype == F32 and pre.dtype == F16 and out.is_contiguous()
        assert_parity(out, base, ref, name=f"out ({activation}, gate {gate_dtype})")
        assert_parity(pre, F.linear(x, w, b), F.linear(x.double(), w.double(), b.double()), name="preact")


def test_forward_float32_gate_without_residual_and_out_dtype(device):
    """A float32 gate alone makes a float32 output (DiT's fp32 modulation outside autocast); a 16-bit
    gate with ``out_dtype=float32`` too; the output dtype is never narrower than promote(...)."""
    x, w, b, res, _ = _data(33, 72, 48, F16, device)
    gate = torch.randn(3, 48, device=device)
    out, _ = k.fused_linear_forward(x, w, b, activation="silu", gate=gate, gate_rows=11)
    base = mixed_forward_reference(x, w, b, "silu", None, gate, 11, None)
    assert out.dtype == base.dtype == F32
    assert_parity(out, base, mixed_forward_reference(x, w, b, "silu", None, gate, 11, torch.float64), name="out")
    out, _ = k.fused_linear_forward(x, w, b, residual=res, out_dtype=F32)
    assert out.dtype == F32
    assert_parity(out, res.float() + F.linear(x, w, b).float(), res.double() + F.linear(x.double(), w.double(), b.double()),
                  name="out (out_dtype=float32)")
    assert k.out_dtype_of(F16, res, gate.half()) == F16 and k.out_dtype_of(torch.bfloat16, res) == F32
    with pytest.raises(TypeError, match=r"out_dtype must be x's dtype \(torch.float16\) or torch.float32, at least "
                                        r"promote\(x, residual, gate\) = torch.float32; got torch.float16"):
        k.fused_linear_forward(x, w, b, gate=gate, gate_rows=11, out_dtype=F16)
    with pytest.raises(TypeError, match=r"out_dtype must be .*got torch.bfloat16"):
        k.fused_linear_forward(x, w, b, out_dtype=torch.bfloat16)


def test_forward_degenerate_k_float32_residual(device):
    """K = 0 with a float32 residual: act(bias) rounded to x's dtype, then added in float32."""
    x, w = torch.randn(4, 0, device=device, dtype=F16), torch.randn(8, 0, device=device, dtype=F16)
    b = torch.randn(8, device=device, dtype=F16)
    res = torch.randn(4, 8, device=device)
    out, _ = k.fused_linear_forward(x, w, b, activation="gelu", residual=res)
    assert out.dtype == F32
    torch.testing.assert_close(out, res + F.gelu(b.float()).half().float().expand(4, 8))


@pytest.mark.parametrize("gate_dtype", GATE_DTYPES)
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_backward_float32_grad(gate_dtype, tma, device):
    """The gradient of a float32 output (fp16 linear) with a float32 / fp16 / no gate: the input and
    weight GEMMs form grad * gate in fp32 and round it to fp16 before the dot (eager's gradient of its
    fp16 y), so dx, dW and dbias come out in fp16; act' of fc1's fp16 pre-activation in dx's epilogue.
    The baseline is eager: ``(grad * gate).half()`` then the fp16 GEMMs."""
    M, N, K = 77, 40, 72
    grad = torch.randn(M, N, device=device)
    w = (torch.randn(N, K, device=device) * N ** -0.5).to(F16)
    x = torch.randn(M, K, device=device, dtype=F16)
    z = torch.randn(M, K, device=device, dtype=F16)
    gate = None if gate_dtype is None else torch.randn(7, N, device=device, dtype=gate_dtype)

    def gated(wide):
        g = grad.to(wide or grad.dtype)
        if gate is not None:
            g = g * gate.to(wide or gate.dtype).repeat_interleave(11, 0)
        return g.to(wide or F16)

    dx = k.fused_linear_backward_input(grad, w, gate=gate, gate_rows=11, act_input="gelu", preact_input=z,
                                       _use_tma=tma)
    assert dx.dtype == F16
    base = _act_grad_reference(z, "gelu", gated(None) @ w)
    ref = _act_grad_reference(z.double(), "gelu", gated(torch.float64) @ w.double())
    assert_parity(dx, base, ref, name="dx")
    for splits in (1, 3):
        dw, db = k.fused_linear_backward_weight(grad, x, gate=gate, gate_rows=11, splits=splits, _use_tma=tma)
        assert dw.dtype == db.dtype == F16
        assert_parity(dw, gated(None).t() @ x, gated(torch.float64).t() @ x.double(), name=f"dW splits={splits}")
        assert_parity(db, gated(None).sum(0), gated(torch.float64).sum(0), name=f"dbias splits={splits}")


@pytest.mark.parametrize("out_dtype", [F32, F16])
def test_backward_gate_and_activation_float32_grad(out_dtype, device):
    """dgate from a float32 grad and an fp16 pre-activation, written in the gate's dtype
    (``out_dtype``); act' of a float32 grad written in the pre-activation's fp16."""
    M, N = 52, 140
    grad = torch.randn(M, N, device=device)
    z = torch.randn(M, N, device=device, dtype=F16)
    dg = k.fused_linear_backward_gate(grad, z, activation="gelu_tanh", gate_rows=26, num_gates=2, out_dtype=out_dtype)
    assert dg.dtype == out_dtype and dg.shape == (2, N)
    base = (grad.to(out_dtype) * act_torch(z, "gelu_tanh").to(out_dtype)).view(2, 26, N).sum(1)
    ref = (grad.double() * act_torch(z.double(), "gelu_tanh")).view(2, 26, N).sum(1)
    assert_parity(dg, base, ref, name=f"dgate ({out_dtype})")
    dz = k.activation_backward(grad, z, "gelu", out_dtype=F16)
    assert dz.dtype == F16
    assert_parity(dz, _act_grad_reference(z, "gelu", grad.half()), _act_grad_reference(z.double(), "gelu", grad.double()),
                  name="act' (float32 grad)")
    with pytest.raises(TypeError, match="out_dtype must be torch.float16, torch.bfloat16 or torch.float32; got torch.float64"):
        k.activation_backward(grad, z, "gelu", out_dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# bad input, configs
# ------------------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(device):
    x, w, b, res, gate = _data(12, 16, 8, torch.float32, device, G=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        k.fused_linear_forward(x, w, activation="relu")
    with pytest.raises(ValueError, match=r"weight must have shape \(\*, 16\); got \(8, 15\)"):
        k.fused_linear_forward(x, w[:, :15])
    with pytest.raises(ValueError, match="x must be 2-D"):
        k.fused_linear_forward(x.view(3, 4, 16), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        k.fused_linear_forward(x, w, b[:4])
    with pytest.raises(ValueError, match=r"residual must have shape \(12, 8\); got \(12, 7\)"):
        k.fused_linear_forward(x, w, residual=res[:, :7])
    with pytest.raises(ValueError, match=r"gate of shape \(3, 8\) with gate_rows=5 covers 15 rows; the GEMM has M=12"):
        k.fused_linear_forward(x, w, gate=gate, gate_rows=5)
    with pytest.raises(TypeError, match="weight must have dtype torch.float32; got torch.float16"):
        k.fused_linear_forward(x, w.half())
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        k.fused_linear_forward(x.double(), w.double())
    with pytest.raises(ValueError, match=r"act_input='gelu' needs preact_input of shape \(12, 16\)"):
        k.fused_linear_backward_input(torch.randn(12, 8, device=device), w, act_input="gelu")
    with pytest.raises(ValueError, match=r"x must have shape \(12, \*\); got \(11, 16\)"):
        k.fused_linear_backward_weight(torch.randn(12, 8, device=device), x[:11])
    with pytest.raises(ValueError, match=r"num_gates=4 x gate_rows=4 must equal the rows of grad \(12, 8\)"):
        k.fused_linear_backward_gate(res, res, gate_rows=4, num_gates=4)
    with pytest.raises(ValueError, match=r"preact must have shape \(12, 8\); got \(12, 7\)"):
        k.activation_backward(res, res[:, :7], "gelu")


def test_config_prunes(monkeypatch):
    """Shared memory per GPU (the TMA epilogue's staging buffer and the backward's gate tiles
    counted), mma.sync's register limit before Hopper, and the 128-register accumulators dropped
    where a gate or act' is applied through pointers (they spilled compiled for sm_90)."""
    monkeypatch.setattr(k, "_INTERPRET", False)
    fwd = k._make_configs(k._FWD_SHAPES, hook=k._set_desc_blocks)
    bwd = k._make_configs(k._BWD_SHAPES, hook=k._set_bwd_input_blocks)
    bf16 = {"X": torch.empty(1, dtype=torch.bfloat16)}
    fp32 = {"X": torch.empty(1, dtype=torch.float32)}

    def small_acc(configs):
        return all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) < 128 for c in configs)

    monkeypatch.setattr(k, "_capability", lambda t: (9, 0))
    assert len(k._prune_fwd(fwd, bf16, USE_TMA=True, ACTIVATION=1, HAS_GATE=True)) == len(fwd)  # 192 + 32 KiB fit
    kept = k._prune_fwd(fwd, fp32, USE_TMA=True)
    assert kept and all(k._smem_bytes(c, 4, tma_epilogue=True) <= k.SMEM_LIMIT for c in kept) and len(kept) < len(fwd)
    assert len(k._prune_fwd(fwd, bf16, USE_TMA=False, ACTIVATION=0)) == len(fwd)
    assert small_acc(k._prune_fwd(fwd, bf16, USE_TMA=False, ACTIVATION=1))
    assert len(k._prune_bwd(bwd, bf16, HAS_GATE=False, ACT_INPUT=0)) == len(bwd)
    gated = k._prune_bwd(bwd, bf16, HAS_GATE=True, ACT_INPUT=0)
    assert small_acc(gated) and len(gated) < len(bwd)
    assert small_acc(k._prune_bwd(bwd, bf16, HAS_DBIAS=True, ACT_INPUT=1))
    # fp32 with a gate: the gate tiles double A's buffers (128x64x64 in 4 stages needs 320 KiB)
    kept = k._prune_bwd(bwd, fp32, HAS_GATE=True)
    assert all(k._smem_bytes(c, 4, gate_tiles=True) <= k.SMEM_LIMIT for c in kept)
    assert (128, 64, 64) not in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept}
    # a float32 output (bf16 linear, float32 residual stream): the TMA epilogue runs in quarters, its
    # staging buffer stays 32 KiB at 128x256 (every config fits); element sizes read from descriptors' bases
    from triton.tools.tensor_descriptor import TensorDescriptor

    x16 = torch.empty(64, 64, dtype=torch.bfloat16)
    mixed = {"X": TensorDescriptor(x16, [64, 64], [64, 1], [16, 16]), "W": TensorDescriptor(x16, [64, 64], [64, 1], [16, 16]),
             "BIAS": torch.empty(1, dtype=torch.float32), "OUT": torch.empty(1, dtype=torch.float32)}
    assert len(k._prune_fwd(fwd, mixed, USE_TMA=True)) == len(fwd)
    assert all(k._smem_bytes(c, 2, tma_epilogue=True, out_elem=4) == k._smem_bytes(c, 2, tma_epilogue=True) for c in fwd)
    mixed["X"] = mixed["W"] = torch.empty(1, dtype=torch.float32)  # an fp32 linear: 4-byte tiles, halves
    assert len(k._prune_fwd(fwd, mixed, USE_TMA=True)) == len(k._prune_fwd(fwd, fp32, USE_TMA=True)) < len(fwd)
    # float32 grad tiles (A) next to bf16 weight tiles (B) in the backward
    grad32 = {"DY": torch.empty(1, dtype=torch.float32), "W": torch.empty(1, dtype=torch.bfloat16)}
    kept = k._prune_bwd(bwd, grad32, HAS_GATE=False)
    assert all(k._smem_bytes(c, 4, b_elem=2) <= k.SMEM_LIMIT for c in kept)
    assert len(kept) == len([c for c in bwd if k._smem_bytes(c, 4, b_elem=2) <= k.SMEM_LIMIT])
    # the weight gradient of a float32 grad: no config holding 64+ fp32 grad-tile registers per thread
    wbwd = k._make_configs(k._BWD_SHAPES, hook=k._set_bwd_weight_blocks)
    for gated in (False, True):
        kept = k._prune_bwd(wbwd, {"DY": grad32["DY"], "X": grad32["W"]}, HAS_GATE=gated)
        assert kept and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) < 64 for c in kept)
        assert (128, 256, 64) in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in kept} or gated
    monkeypatch.setattr(k, "_capability", lambda t: (8, 0))
    kept = k._prune_fwd(fwd, bf16, USE_TMA=False)
    assert kept and small_acc(kept) and all(k._smem_bytes(c, 2) <= k.SMEM_LIMIT_SM80 for c in kept)


def test_descriptor_pre_hook_sets_block_shapes():
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = torch.empty(64, 64, dtype=torch.float16)
    nargs = {name: TensorDescriptor(t, [64, 64], [64, 1], [16, 16]) for name in ("X", "W", "OUT", "PRE", "RES")}
    nargs.update(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64)
    k._set_desc_blocks(nargs)
    assert nargs["X"].block_shape == [128, 64] and nargs["W"].block_shape == [256, 64]
    assert nargs["OUT"].block_shape == nargs["PRE"].block_shape == nargs["RES"].block_shape == [128, 128]
    k._set_desc_blocks(dict(nargs, EPI_QUARTERS=True))  # a float32 output: the epilogue in column quarters
    assert nargs["OUT"].block_shape == nargs["PRE"].block_shape == nargs["RES"].block_shape == [128, 64]
    k._set_desc_blocks(nargs)
    k._set_bwd_input_blocks(dict(nargs, DY=nargs["RES"]))
    assert nargs["RES"].block_shape == [128, 64] and nargs["W"].block_shape == [64, 256]
    k._set_bwd_weight_blocks(nargs | {"DY": nargs["OUT"]})
    assert nargs["OUT"].block_shape == [64, 128] and nargs["X"].block_shape == [64, 256]
