"""fused_linear / fused_mlp (uvit_fast.ops.fused_linear): the ops on the Triton kernels against float64.

On CPU the kernels run under the Triton interpreter (tests/conftest.py), outputs NaN-poisoned.
The interpreter pins 32x32x32 tiles (kernels/fused_linear.py), so M = 1, 66, 77, 258 and N = 40,
100 leave partial row / column tiles and K = 72 a partial K tile; K = 1000 / 1152 and N = 1000 /
4608 (U-ViT-H/2's fc1) run in the slow tier. Every case compares the output and every gradient
(x, weight, bias, residual, gate) with the 2x rule: the kernel's max error against float64 is at
most twice plain PyTorch's in the same dtype (uvit_fast.testing.assert_parity).
"""
import importlib

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import uvit_fast
from uvit_fast import dispatch
from uvit_fast.dispatch import TuneCache
from uvit_fast.ops import fused_linear, fused_linear_reference, fused_mlp, fused_mlp_reference
from uvit_fast.ops.fused_linear import ACTIVATIONS
from uvit_fast.testing import CustomOpRecorder, assert_parity

fl = importlib.import_module("uvit_fast.ops.fused_linear")  # the module (uvit_fast.ops.fused_linear is the op)

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
NEEDS_CUDA_BF16 = pytest.mark.skipif(
    not ON_CUDA, reason="bf16 tl.dot is wrong under the Triton interpreter (triton issue 11584); needs a CUDA GPU"
)
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=NEEDS_CUDA_BF16),
]
# the combination tests keep fp32 in the quick subset; their fp16 repeats run in the full suite
DTYPES_FP16_SLOW = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16", marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, id="bf16", marks=NEEDS_CUDA_BF16),
]
ACTS = [pytest.param(a, id=str(a)) for a in ACTIVATIONS]
# the large interpreter shapes run in fp16 by default; their fp32 repeats are extended (docs/testing.md)
DTYPES_FP32_EXTENDED = [
    pytest.param(torch.float32, id="fp32", marks=pytest.mark.extended),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=NEEDS_CUDA_BF16),
]


pytestmark = pytest.mark.usefixtures("no_tf32")  # tests/conftest.py


def _leaf(t, dtype=None):
    if t is None:
        return None
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _gate(kind, lead, N, dtype, device):
    if kind is None:
        return None
    shape = (lead[0], N) if kind == "sample" else (*lead, N)
    return torch.randn(shape, device=device, dtype=dtype)


def _linear_inputs(lead, K, N, dtype, device, *, bias=True, residual=False, gate=None):
    x = torch.randn(*lead, K, device=device, dtype=dtype)
    w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
    b = torch.randn(N, device=device, dtype=dtype) if bias else None
    r = torch.randn(*lead, N, device=device, dtype=dtype) if residual else None
    return x, w, b, r, _gate(gate, lead, N, dtype, device)


def _check(op, ref_op, args, kwargs, names, grad=None):
    """op (backend="triton") vs ref_op in the same dtype vs ref_op in float64: the output and the
    gradient of every tensor argument (positional ``args`` then the tensor ``kwargs``)."""
    tensor_kw = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    other_kw = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    def leaves(dtype=None):
        return [_leaf(t, dtype) for t in args], {k: _leaf(v, dtype) for k, v in tensor_kw.items()}

    (a, ak), (b, bk), (r, rk) = leaves(), leaves(), leaves(torch.float64)
    out = op(*a, **ak, **other_kw, backend="triton")
    base = ref_op(*b, **bk, **other_kw)
    ref = ref_op(*r, **rk, **other_kw)
    assert out.dtype == base.dtype and out.shape == base.shape
    assert_parity(out, base, ref, name="out")
    g = torch.randn_like(out) if grad is None else grad
    out.backward(g)
    base.backward(g)
    ref.backward(g.double())
    for name, t, tb, tr in zip(names, [*a, *ak.values()], [*b, *bk.values()], [*r, *rk.values()]):
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == t.dtype == tb.grad.dtype and t.grad.shape == t.shape, name
        assert_parity(t.grad, tb.grad, tr.grad, name=f"d{name}")


def _check_linear(x, w, b, r, gate, activation, grad=None):
    _check(
        fused_linear, fused_linear_reference, (x, w, b),
        {"residual": r, "gate": gate, "activation": activation},
        ["x", "weight", "bias"] + [n for n, t in (("residual", r), ("gate", gate)) if t is not None],
        grad,
    )


def _check_mlp(x, w1, b1, w2, b2, r, gate, activation):
    names = ["x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    names += [n for n, t in (("residual", r), ("gate", gate)) if t is not None]
    _check(fused_mlp, fused_mlp_reference, (x, w1, b1, w2, b2), {"residual": r, "gate": gate, "activation": activation}, names)


def _mlp_inputs(lead, K, H, N, dtype, device, *, bias=True, residual=False, gate=None):
    x = torch.randn(*lead, K, device=device, dtype=dtype)
    w1 = torch.randn(H, K, device=device, dtype=dtype) * K ** -0.5
    w2 = torch.randn(N, H, device=device, dtype=dtype) * H ** -0.5
    b1 = torch.randn(H, device=device, dtype=dtype) if bias else None
    b2 = torch.randn(N, device=device, dtype=dtype) if bias else None
    r = torch.randn(*lead, N, device=device, dtype=dtype) if residual else None
    return x, w1, b1, w2, b2, r, _gate(gate, lead, N, dtype, device)


# ---------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize("activation", ACTS)
def test_linear_every_activation(activation, dtype, device):
    """Every activation with bias, a residual and DiT's per-sample gate: M = 66 (three row tiles, the
    last of 2 rows), K = 72 (a partial K tile), N = 100 (a partial column tile)."""
    _check_linear(*_linear_inputs((2, 33), 72, 100, dtype, device, residual=True, gate="sample"), activation)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize(
    "lead, bias, residual, gate, activation",
    [
        ((1, 1), True, False, None, None),  # M = 1: the bare GEMM with bias
        ((1, 77), False, False, None, "gelu"),  # CLIP's 77 tokens, no bias
        ((3, 5), True, True, None, "gelu_tanh"),  # plain residual (U-ViT's proj / fc2)
        ((2, 7), False, True, "token", "silu"),  # per-token gate, no bias
        ((5,), True, False, "token", "quick_gelu"),  # 2-D input (M, K), per-token gate
        ((2, 9), True, False, "sample", None),  # gate without residual or activation
    ],
    ids=["M1-bias", "L77-nobias", "residual", "token-gate", "2d-token-gate", "sample-gate-only"],
)
def test_linear_epilogue_combinations(lead, bias, residual, gate, activation, dtype, device):
    _check_linear(*_linear_inputs(lead, 72, 40, dtype, device, bias=bias, residual=residual, gate=gate), activation)


EXTENDED = pytest.mark.extended  # minutes each under the interpreter (docs/testing.md)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES_FP32_EXTENDED)
@pytest.mark.parametrize(
    "lead, K, N, activation, gate",
    [
        ((1, 258), 72, 72, "gelu", "sample"),  # U-ViT's 258 tokens: nine row tiles, the last of 2 rows
        ((1, 5), 1000, 1000, "gelu_tanh", "sample"),  # K and N with partial tiles in both (1000 = 31*32 + 8)
        ((1, 3), 72, 4608, "silu", "token"),  # fc1's N = 4608: 144 column tiles
        ((1, 3), 1152, 72, None, "sample"),  # K = 1152: 36 K steps forward, 36 dW column tiles
        pytest.param((1, 3), 1152, 4608, "gelu", None, marks=EXTENDED),  # U-ViT-H/2's fc1 with a 3-row M
        pytest.param((1, 3), 4608, 1152, None, "token", marks=EXTENDED),  # ... and its fc2
    ],
    ids=["L258", "K1000-N1000", "N4608", "K1152", "fc1-H2", "fc2-H2"],
)
def test_linear_large_shapes(lead, K, N, activation, gate, dtype, device):
    _check_linear(*_linear_inputs(lead, K, N, dtype, device, residual=True, gate=gate), activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead, activation, bias, residual, gate",
    [
        ((2, 33), "gelu", True, True, None),  # U-ViT's MLP with its residual
        ((2, 17), "gelu_tanh", True, True, "sample"),  # DiT's gated MLP
    ],
    ids=["uvit", "dit"],
)
def test_mlp_parity(lead, activation, bias, residual, gate, dtype, device):
    _check_mlp(*_mlp_inputs(lead, 72, 160, 72, dtype, device, bias=bias, residual=residual, gate=gate), activation)


@pytest.mark.parametrize("dtype", DTYPES_FP16_SLOW)
@pytest.mark.parametrize(
    "lead, activation, bias, residual, gate",
    [
        ((1, 77), "quick_gelu", True, False, None),  # CLIP's MLP without residual
        ((3, 4), "silu", False, True, "token"),  # no biases, per-token gate
        ((1, 1), None, True, False, None),  # M = 1, no activation
    ],
    ids=["clip", "silu-token-gate", "M1-noact"],
)
def test_mlp_combinations(lead, activation, bias, residual, gate, dtype, device):
    _check_mlp(*_mlp_inputs(lead, 72, 160, 72, dtype, device, bias=bias, residual=residual, gate=gate), activation)


@pytest.mark.slow
@EXTENDED
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_uvit_h_width(dtype, device):
    """U-ViT-H/2's MLP widths (1152 -> 4608 -> 1152) at a 3-row M, residual and per-sample gate."""
    _check_mlp(*_mlp_inputs((1, 3), 1152, 4608, 1152, dtype, device, residual=True, gate="sample"), "gelu")


def test_strided_inputs(device):
    """Views read in place: a slice of a wider buffer, a transposed weight, a strided bias and an
    expanded (stride-0) output gradient."""
    B, L, K, N = 2, 21, 72, 48
    x = torch.randn(B, L + 3, 2 * K, device=device)[:, 2 : L + 2, K:]
    w = (torch.randn(K, N, device=device) * K ** -0.5).t()
    b = torch.randn(2 * N, device=device)[::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    r, g = torch.randn(B, L, N, device=device), torch.randn(B, N, device=device)
    _check_linear(x, w, b, r, g, "gelu")
    _check_linear(x, w, b, None, None, "silu", grad=torch.ones((), device=device).expand(B, L, N))
    # a (B, N, L)-transposed residual and a column-strided gate; the MLP on the same views
    r_t = torch.randn(B, N, L, device=device).transpose(1, 2)
    g_s = torch.randn(B, 2 * N, device=device)[:, ::2]
    _check_linear(x, w, b, r_t, g_s, "gelu_tanh")
    w2 = (torch.randn(N, N, device=device) * N ** -0.5).t()
    _check_mlp(x, w, b, w2, None, r_t, g_s, "gelu")


def test_partial_gradients_run_only_the_needed_kernels(device):
    x, w, b, _, _ = _linear_inputs((2, 9), 72, 40, torch.float32, device)
    xl = x.clone().requires_grad_(True)
    with CustomOpRecorder() as rec:
        fused_linear(xl, w, b, activation="gelu", backend="triton").sum().backward()
    assert any("backward_input" in o for o in rec.ops) and not any("backward_weight" in o for o in rec.ops), rec.ops
    wl = w.clone().requires_grad_(True)
    with CustomOpRecorder() as rec:
        fused_linear(x, wl, b, backend="triton").sum().backward()
    assert any("backward_weight" in o for o in rec.ops) and not any("backward_input" in o for o in rec.ops), rec.ops
    # no gradient at all: no pre-activation written, no backward op
    with CustomOpRecorder() as rec, torch.no_grad():
        fused_linear(x, w, b, activation="gelu", gate=torch.randn(2, 40), backend="triton")
    assert rec.ops == {"uvit_fast.fused_linear.default"}


def test_empty_batch(device):
    x, w, b, r, g = _linear_inputs((0, 7), 64, 32, torch.float32, device, residual=True, gate="sample")
    leaves = [_leaf(t) for t in (x, w, b, r, g)]
    out = fused_linear(*leaves[:3], residual=leaves[3], gate=leaves[4], activation="gelu", backend="triton")
    assert out.shape == (0, 7, 32)
    out.sum().backward()
    assert leaves[0].grad.shape == x.shape
    assert torch.equal(leaves[1].grad, torch.zeros_like(w)) and torch.equal(leaves[2].grad, torch.zeros_like(b))


# ---------------------------------------------------------------------------------------------
# The MLP's two-op design
# ---------------------------------------------------------------------------------------------
def _saved_tensors(fn):
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, packed


@pytest.mark.parametrize("gate", [None, "sample"])
def test_mlp_saves_what_eager_saves(gate, device):
    """Saved for backward: x, fc1's weight, h, z (the pre-activation, once), fc2's weight (and, when
    gated, the gate and fc2's output), each once, the same set as eager (classified by storage:
    the inputs by identity, the (M, H) hidden tensors and the (M, N) output by size)."""
    lead, K, H, N = (2, 9), 8, 32, 8
    x, w1, b1, w2, b2, r, g = _mlp_inputs(lead, K, H, N, torch.float32, device, residual=True, gate=gate)
    leaves = [_leaf(t) for t in (x, w1, b1, w2, b2, g)]
    inputs = {"x": leaves[0], "fc1_weight": leaves[1], "fc2_weight": leaves[3], "gate": leaves[5]}
    M = x.numel() // K

    def classify(packed):
        kinds, storages = [], set()
        for t in packed:
            ptr = t.untyped_storage().data_ptr()
            assert ptr not in storages, f"a storage saved twice: {tuple(t.shape)}"
            storages.add(ptr)
            name = next((n for n, i in inputs.items() if i is not None and i.untyped_storage().data_ptr() == ptr), None)
            kinds.append(name or {M * H: "hidden", M * N: "out"}.get(t.numel(), f"other{tuple(t.shape)}"))
        return sorted(kinds)

    def run(backend):
        return fused_mlp(*leaves[:5], residual=r, gate=leaves[5], activation="gelu", backend=backend)

    _, eager = _saved_tensors(lambda: run("torch"))
    _, fused = _saved_tensors(lambda: run("triton"))
    expected = ["fc1_weight", "fc2_weight", "hidden", "hidden", "x"] + (["gate", "out"] if gate else [])
    assert classify(eager) == sorted(expected)
    assert classify(fused) == sorted(expected)
    assert sum(t.numel() for t in fused) == sum(t.numel() for t in eager)


def test_mlp_backward_runs_dgelu_in_fc2_input_gradient(monkeypatch, device):
    """fc2's input-gradient GEMM gets act_input and z (M, H): dGELU in its epilogue; no separate
    activation-backward pass runs, and fc1's input gradient has no activation."""
    from uvit_fast.kernels import fused_linear as k

    calls = []

    def record(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return wrapped

    for name in ("fused_linear_backward_input", "activation_backward", "fused_linear_backward_weight"):
        monkeypatch.setattr(k, name, record(name, getattr(k, name)))
    lead, K, H, N = (2, 5), 72, 96, 40
    x, w1, b1, w2, b2, r, g = _mlp_inputs(lead, K, H, N, torch.float32, device, residual=True, gate="sample")
    leaves = [_leaf(t) for t in (x, w1, b1, w2, b2)]
    fused_mlp(*leaves, residual=r, gate=g, activation="gelu_tanh", backend="triton").sum().backward()
    dx_calls = [(a, kw) for n, a, kw in calls if n == "fused_linear_backward_input"]
    assert len(dx_calls) == 2, calls
    (fc2_args, fc2_kw), (fc1_args, fc1_kw) = dx_calls  # backward runs fc2's first
    assert fc2_kw["act_input"] == "gelu_tanh" and tuple(fc2_kw["preact_input"].shape) == (10, H)
    assert fc2_kw["gate"] is not None and fc2_kw["gate_rows"] == 5
    assert fc1_kw["act_input"] is None and fc1_kw["preact_input"] is None
    assert not [n for n, _, _ in calls if n == "activation_backward"]
    assert len([n for n, _, _ in calls if n == "fused_linear_backward_weight"]) == 2


def test_mlp_inference_writes_no_preactivation(monkeypatch, device):
    from uvit_fast.kernels import fused_linear as k

    seen = []
    real = k.fused_linear_forward
    monkeypatch.setattr(k, "fused_linear_forward", lambda *a, **kw: (seen.append(kw["store_preact"]), real(*a, **kw))[1])
    x, w1, b1, w2, b2, _, _ = _mlp_inputs((1, 5), 72, 96, 40, torch.float32, device)
    with torch.no_grad():
        fused_mlp(x, w1, b1, w2, b2, backend="triton")
    assert seen == [False, False]
    seen.clear()
    fused_mlp(x.requires_grad_(True), w1, b1, w2, b2, backend="triton")
    assert seen == [True, False]  # z for dGELU; fc2 has no gate, so no pre-gate output


# ---------------------------------------------------------------------------------------------
# Dtypes and autocast
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which, amp", [
    ("linear", torch.float16), ("mlp", torch.bfloat16),
    pytest.param("linear", torch.bfloat16, marks=pytest.mark.slow), pytest.param("mlp", torch.float16, marks=pytest.mark.slow),
], ids=["linear-fp16", "mlp-bf16", "linear-bf16", "mlp-fp16"])
def test_autocast_dtypes_match_the_reference(which, amp, device):
    """Under autocast the torch and triton paths give the reference's dtypes: the linear's output in
    the autocast dtype, promoted by a float32 residual (the residual stream) to float32, gradients
    in the leaves' float32 (bf16 values are not compared: the interpreter's bf16 tl.dot is wrong)."""
    lead, K, H, N = (2, 5), 72, 96, 40
    x, w1, b1, w2, b2, r, g = _mlp_inputs(lead, K, H, N, torch.float32, device, residual=True, gate="sample")
    if which == "linear":
        w1, b1 = torch.randn(N, K, device=device) * K ** -0.5, torch.randn(N, device=device)
    for residual, gate, want in ((None, None, amp), (r, None, torch.float32), (r, g.to(amp), torch.float32),
                                 (None, g.to(amp), amp), (None, g, torch.float32)):
        dtypes = set()
        for backend in ("torch", "triton"):
            leaves = [_leaf(t) for t in (x, w1, b1, w2, b2)]
            with torch.autocast(device.type, dtype=amp):
                if which == "linear":
                    out = fused_linear(leaves[0], leaves[1], leaves[2], activation="gelu", residual=residual,
                                       gate=gate, backend=backend)
                    ref = fused_linear_reference(leaves[0], leaves[1], leaves[2], activation="gelu",
                                                 residual=residual, gate=gate)
                else:
                    out = fused_mlp(*leaves, residual=residual, gate=gate, backend=backend)
                    ref = fused_mlp_reference(*leaves, residual=residual, gate=gate)
            assert out.dtype == ref.dtype == want, (backend, out.dtype, ref.dtype, want)
            out.float().sum().backward()
            used = leaves[:3] if which == "linear" else leaves
            assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in used)
            dtypes.add(out.dtype)
        assert len(dtypes) == 1


@pytest.mark.parametrize("gate_dtype", [torch.float16, torch.float32], ids=["fp16-gate", "fp32-gate"])
@pytest.mark.parametrize("which", ["linear", "mlp"])
def test_autocast_fp16_parity(which, gate_dtype, monkeypatch, device):
    """fp16 autocast with a float32 residual stream and a per-sample gate (fp16, as adaLN's linear
    gives under autocast, or float32): the values and every gradient, against the float64
    reference of the same computation (parameters rounded to fp16 first), in eager's dtypes; the
    residual and gate are fused into the kernel (its output is float32)."""
    amp = torch.float16
    seen = _record_forward(monkeypatch)
    x, w1, b1, w2, b2, r, g = _mlp_inputs((2, 33), 72, 96, 72, torch.float32, device, residual=True, gate="sample")
    g = g.to(gate_dtype)
    if which == "linear":
        w1, b1 = torch.randn(72, 72, device=device) * 72 ** -0.5, torch.randn(72, device=device)
    params = (x, w1, b1) if which == "linear" else (x, w1, b1, w2, b2)

    def call(ts, backend=None, ref=False):
        fn = (fused_linear_reference if which == "linear" else fused_mlp_reference) if ref else (
            fused_linear if which == "linear" else fused_mlp)
        kw = {"activation": "gelu", "residual": ts[-2], "gate": ts[-1]}
        if backend:
            kw["backend"] = backend
        return fn(*ts[:-2], **kw)

    a = [_leaf(t) for t in (*params, r, g)]
    b = [_leaf(t) for t in (*params, r, g)]
    r64 = [_leaf(t.to(amp), torch.float64) for t in params] + [_leaf(r, torch.float64), _leaf(g, torch.float64)]
    with torch.autocast(device.type, dtype=amp):
        out = call(a, "triton")
        base = call(b, ref=True)
    ref = call(r64, ref=True)
    assert out.dtype == base.dtype == torch.float32
    assert seen[-1] == (torch.float32, gate_dtype, torch.float32)
    assert_parity(out, base, ref, atol=4e-3, name="out (autocast)")
    gr = torch.randn_like(out)
    out.backward(gr)
    base.backward(gr)
    ref.backward(gr.double())
    for i, (t, tb, tr) in enumerate(zip(a, b, r64)):
        assert t.grad.dtype == t.dtype == tb.grad.dtype
        assert_parity(t.grad, tb.grad, tr.grad, atol=4e-3, name=f"grad {i} (autocast)")


def _record_forward(monkeypatch):
    """The forward launcher's calls: (residual dtype, gate dtype, output dtype) of each."""
    from uvit_fast.kernels import fused_linear as k

    seen = []
    real = k.fused_linear_forward

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(tuple(None if kw.get(n) is None else kw[n].dtype for n in ("residual", "gate")) + (out[0].dtype,))
        return out

    monkeypatch.setattr(k, "fused_linear_forward", spy)
    return seen


F32_STREAM = [
    pytest.param("sample", torch.float32, id="fp32-gate"),
    pytest.param("sample", torch.float16, id="fp16-gate"),
    pytest.param("token", torch.float32, id="fp32-token-gate"),
    pytest.param(None, None, id="no-gate"),
]


@pytest.mark.parametrize("gate, gate_dtype", F32_STREAM)
def test_float32_residual_stream_outside_autocast(gate, gate_dtype, monkeypatch, device):
    """fp16 x and weights with a float32 residual and a float32 or fp16 gate (DiT with float32
    modulation weights): the kernel reads both in their own dtypes and writes the float32 output
    (no PyTorch epilogue after it); the output and every gradient match eager's dtypes and pass the
    2x rule against float64."""
    seen = _record_forward(monkeypatch)
    x, w, b, _, _ = _linear_inputs((2, 9), 72, 40, torch.float16, device)
    r = torch.randn(2, 9, 40, device=device)
    g = _gate(gate, (2, 9), 40, gate_dtype, device)
    _check_linear(x, w, b, r, g, "silu")
    assert seen == [(torch.float32, gate_dtype, torch.float32)]


@pytest.mark.parametrize("gate, gate_dtype", F32_STREAM[:2] + F32_STREAM[3:])
def test_mlp_float32_residual_stream_outside_autocast(gate, gate_dtype, monkeypatch, device):
    """The MLP with fp16 weights, a float32 residual and a float32 / fp16 / no gate: fc2's kernel
    writes float32; dz, every weight, bias, residual and gate gradient in eager's dtypes (2x rule)."""
    seen = _record_forward(monkeypatch)
    x, w1, b1, w2, b2, _, _ = _mlp_inputs((2, 9), 72, 96, 40, torch.float16, device)
    r = torch.randn(2, 9, 40, device=device)
    _check_mlp(x, w1, b1, w2, b2, r, _gate(gate, (2, 9), 40, gate_dtype, device), "gelu_tanh")
    assert seen == [(None, None, torch.float16), (torch.float32, gate_dtype, torch.float32)]


def test_float64_residual_stays_outside_the_kernel(device):
    """A float64 residual (a dtype the kernels do not read) is added after the fp32 kernel, in float64."""
    x, w, b, _, g = _linear_inputs((2, 9), 72, 40, torch.float32, device, gate="sample")
    r = torch.randn(2, 9, 40, device=device, dtype=torch.float64)
    out = fused_linear(x, w, b, activation="gelu", residual=r, gate=g, backend="triton")
    ref = fused_linear_reference(x, w, b, activation="gelu", residual=r, gate=g)
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, FLOP counting
# ---------------------------------------------------------------------------------------------
def _opcheck_cases():
    """(op name, argument factory) for every custom op, with and without the optional tensors."""
    M, K, H, N = 18, 72, 96, 40

    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    def lf(*shape):
        return r(*shape).requires_grad_(True)

    def r16(*shape):
        return r(*shape).half()

    def lf16(*shape):
        return r16(*shape).requires_grad_(True)

    return [
        ("fused_linear", lambda: (lf(M, K), lf(N, K), lf(N), lf(M, N), lf(2, N), "gelu", 9, True)),
        ("fused_linear", lambda: (lf(M, K), lf(N, K), None, None, None, None, 1, False)),
        ("fused_linear", lambda: (lf(M, K), lf(N, K), lf(N), None, lf(M, N), "quick_gelu", 1, True)),
        ("fused_mlp_fc1", lambda: (lf(M, K), lf(H, K), lf(H), "gelu", True)),
        ("fused_mlp_fc2", lambda: (r(M, H), lf(M, H), lf(N, H), lf(N), lf(M, N), lf(2, N), "gelu", 9, True)),
        ("fused_mlp_fc2", lambda: (r(M, H), lf(M, H), lf(N, H), None, None, None, None, 1, False)),
        # the pair as one op: what measured dispatch runs under torch.compile (uvit_fast.ops._runtime)
        ("fused_mlp", lambda: (lf(M, K), lf(H, K), lf(H), lf(N, H), lf(N), lf(M, N), lf(2, N), "gelu_tanh", 9, True, True)),
        ("fused_mlp", lambda: (lf(M, K), lf(H, K), None, lf(N, H), None, None, None, "gelu", 1, True, False)),
        ("fused_linear_backward_input", lambda: (r(M, N), r(N, K), r(3, N), 6, "gelu", r(M, K))),
        ("fused_linear_backward_input", lambda: (r(M, N), r(N, K), None, 1, None, None)),
        ("fused_linear_backward_weight", lambda: (r(M, N), r(M, K), r(3, N), 6, True)),
        ("fused_linear_backward_weight", lambda: (r(M, N), r(M, K), None, 1, False)),
        ("fused_linear_backward_gate", lambda: (r(M, N), r(M, N), "silu", 6, 3, torch.float32)),
        ("fused_linear_backward_gate", lambda: (r(M, N), r(M, N), None, 1, M, torch.float32)),
        ("fused_linear_activation_backward", lambda: (r(M, N), r(M, N), "gelu_tanh")),
        # mixed dtypes: fp16 linears with a float32 residual stream and a float32 or fp16 gate
        ("fused_linear", lambda: (lf16(M, K), lf16(N, K), lf16(N), lf(M, N), lf(2, N), "gelu", 9, True)),
        ("fused_linear", lambda: (lf16(M, K), lf16(N, K), None, lf(M, N), lf16(M, N), None, 1, True)),
        ("fused_mlp_fc2", lambda: (r16(M, H), lf16(M, H), lf16(N, H), lf16(N), lf(M, N), lf(2, N), "gelu", 9, True)),
        ("fused_mlp", lambda: (lf16(M, K), lf16(H, K), lf16(H), lf16(N, H), lf16(N), lf(M, N), lf16(2, N), "gelu_tanh",
                               9, True, True)),
        ("fused_linear_backward_input", lambda: (r(M, N), r16(N, K), r(3, N), 6, "gelu", r16(M, K))),
        ("fused_linear_backward_weight", lambda: (r(M, N), r16(M, K), r16(3, N), 6, True)),
        ("fused_linear_backward_gate", lambda: (r(M, N), r16(M, N), "gelu", 6, 3, torch.float16)),
        ("fused_linear_activation_backward", lambda: (r(M, N), r16(M, N), "gelu")),
    ]


def _opcheck_params():
    """Every case; the quick subset keeps the first of each op (the repeats are slow)."""
    seen = set()
    for i, (n, args) in enumerate(_opcheck_cases()):
        yield pytest.param(n, args, id=f"{n}-{i}", marks=[pytest.mark.slow] if n in seen else [])
        seen.add(n)


@pytest.mark.parametrize("name, args", _opcheck_params())
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.uvit_fast, name).default, args())


@pytest.mark.parametrize("which", ["linear", "mlp"])
def test_torch_compile_fullgraph(which, device):
    """torch.compile(fullgraph=True) traces the custom ops forward and backward (AOTAutograd with
    the traced graphs run as they are, no Inductor, which the CPU tier cannot afford here); the
    graphs hold the forward ops and the fused backward ops."""
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm.code)
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    x, w1, b1, w2, b2, r, g = _mlp_inputs((2, 9), 72, 96, 40, torch.float32, device, residual=True, gate="sample")

    def f(x, w1, b1, w2, b2, r, g):
        if which == "linear":
            return fused_linear(x, w1, b1, activation="gelu", residual=None, gate=None, backend="triton").square()
        return fused_mlp(x, w1, b1, w2, b2, activation="gelu_tanh", residual=r, gate=g, backend="triton").square()

    torch._dynamo.reset()
    leaves = [_leaf(t) for t in (x, w1, b1, w2, b2, r, g)]
    out = torch.compile(f, fullgraph=True, backend=backend)(*leaves)
    out.sum().backward()
    fw, bw = "\n".join(graphs["fw"]), "\n".join(graphs["bw"])
    if which == "linear":
        assert "uvit_fast.fused_linear.default" in fw
        assert "fused_linear_activation_backward" in bw and "fused_linear_backward_weight" in bw
    else:
        assert "fused_mlp_fc1" in fw and "fused_mlp_fc2" in fw
        assert bw.count("uvit_fast.fused_linear_backward_input.default(") == 2 and "fused_linear_backward_gate" in bw
        assert "activation_backward" not in bw  # dGELU in fc2's input-gradient epilogue
    eager = [_leaf(t) for t in (x, w1, b1, w2, b2, r, g)]
    f(*eager).sum().backward()
    torch.testing.assert_close(out, f(*[t.detach() for t in eager]), rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves, eager):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [pytest.param("forced", marks=pytest.mark.slow), "measured"])
def test_compile_float32_residual_stream(mode, fresh, monkeypatch, device):
    """torch.compile(fullgraph=True) of the MLP with fp16 weights, a float32 residual and an fp16
    gate: forced onto the kernels, and through the run-time dispatch op with the Triton side timed
    fastest (the composite uvit_fast::fused_mlp): the float32 output and every gradient in eager's
    dtypes, equal to the eager Triton call's."""
    import torch._dynamo

    if mode == "measured":
        times = iter([3.0, 1.0])  # torch, triton
        monkeypatch.setattr(dispatch, "default_timer", lambda device_type: (lambda fn: (fn(), next(times))[1]))
    x, w1, b1, w2, b2, _, g = _mlp_inputs((2, 9), 72, 96, 40, torch.float16, device, gate="sample")
    r = torch.randn(2, 9, 40, device=device)
    backend = "triton" if mode == "forced" else "auto"

    def f(*t):
        return fused_mlp(*t[:5], activation="gelu_tanh", residual=t[5], gate=t[6], backend=backend)

    codes = []

    def keep(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    leaves = [_leaf(t) for t in (x, w1, b1, w2, b2, r, g)]
    out = torch.compile(f, fullgraph=True, backend=keep)(*leaves)
    out.backward(torch.ones_like(out))
    eager = [_leaf(t) for t in (x, w1, b1, w2, b2, r, g)]
    want = fused_mlp(*eager[:5], activation="gelu_tanh", residual=eager[5], gate=eager[6], backend="triton")
    want.backward(torch.ones_like(want))
    assert out.dtype == want.dtype == torch.float32
    assert ("uvit_fast.fused_mlp_dispatch" if mode == "measured" else "uvit_fast.fused_mlp_fc2") in codes[0]
    if mode == "measured":
        assert [d.choice for d in fresh.decisions().values()] == ["triton"]
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(leaves, eager):
        assert a.grad.dtype == b.grad.dtype == a.dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-3)


def test_flop_counter_counts_the_custom_ops(device):
    from torch.utils.flop_counter import FlopCounterMode

    M, K, H, N = 10, 72, 96, 40
    x, w1, b1, w2, b2, _, _ = _mlp_inputs((2, 5), K, H, N, torch.float32, device)
    leaves = [_leaf(t) for t in (x, w1, b1, w2, b2)]
    for backend in ("torch", "triton"):
        counter = FlopCounterMode(display=False)
        with counter:
            fused_mlp(*leaves, backend=backend).sum().backward()
        # forward 2 GEMMs, backward 4 (dx and dW each), 2 flops per multiply-add
        assert counter.get_total_flops() == 3 * (2 * M * K * H + 2 * M * H * N), backend
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fused_linear(x, w1, b1, activation="gelu", backend="triton")
    assert counter.get_total_flops() == 2 * M * K * H


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------
def test_untimed_auto_is_pytorch_and_triton_is_forced(monkeypatch, device):
    monkeypatch.setenv(dispatch.ENV_TUNE, "0")
    x, w, b, r, g = _linear_inputs((2, 5), 72, 40, torch.float32, device, residual=True, gate="sample")
    with CustomOpRecorder() as rec:
        fused_linear(x, w, b, activation="gelu", residual=r, gate=g)
        fused_mlp(x, torch.randn(96, 72), None, torch.randn(40, 96), None)
    assert not rec.ops  # untimed auto: PyTorch on every device (cuBLAS + eager epilogue on CUDA)
    with CustomOpRecorder() as rec, uvit_fast.use_backend("triton"):
        fused_linear(x, w, b, activation="gelu", residual=r, gate=g)
    assert rec.ops == {"uvit_fast.fused_linear.default"}
    # float64: the kernels do not compute in it; auto falls back, triton says so
    out = fused_linear(x.double(), w.double(), b.double(), activation="gelu")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match=r"backend='triton' supports float16, bfloat16 and float32; got torch.float64"):
        fused_linear(x.double(), w.double(), b.double(), backend="triton")
    with pytest.raises(TypeError, match=r"fused_mlp: backend='triton' supports .* got torch.float64"):
        fused_mlp(x.double(), torch.randn(96, 72).double(), None, torch.randn(40, 96).double(), None, backend="triton")


@pytest.mark.parametrize("training", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["infer", "train"])
def test_measured_dispatch_keeps_pytorch_under_the_interpreter(fresh, training, device):
    """UVIT_FAST_TUNE=1 on CPU: the candidates are timed for real (the interpreter is far slower than
    PyTorch), a PyTorch path wins and is recorded in the cache file; the erf-GELU addmm_activation candidate
    is offered on CPU for inference only (it has no autograd)."""
    x, w, b, r, g = _linear_inputs((1, 77), 72, 40, torch.float32, device, residual=True, gate="sample")
    w2 = torch.randn(40, 40, device=device) * 40 ** -0.5
    if training:
        x.requires_grad_(True)
    with CustomOpRecorder():
        fused_linear(x, w, b, activation="gelu", residual=r, gate=g)
        fused_mlp(x, w, b, w2, None, activation="gelu", residual=r)
    decisions = fresh.decisions()
    assert len(decisions) == 2
    for key, d in decisions.items():
        assert key.split("[")[0] in ("fused_linear", "fused_mlp")
        assert ("|train|" if training else "|infer|") in key
        assert "act=gelu" in key and "residual=1" in key
        assert d.choice in ("torch", "addmm_activation"), d  # a PyTorch path (the two are about equal on CPU)
        assert d.timings_ms["triton"] is not None and d.timings_ms["triton"] > d.timings_ms[d.choice]
        assert ("addmm_activation" in d.timings_ms) is (not training)
    assert "gate=sample" in next(k for k in decisions if k.startswith("fused_linear"))
    stored = TuneCache(fresh.cache.path).load()
    assert {k: d.choice for k, d in stored.items()} == {k: d.choice for k, d in decisions.items()}


def test_measured_winner_runs(fresh, monkeypatch, device):
    """Injected timings: whichever candidate measures fastest runs (triton, then addmm_activation)."""
    x, w, b, _, _ = _linear_inputs((1, 9), 72, 40, torch.float32, device)
    for times, winner, fused in (([3.0, 2.0, 1.0], "triton", True), ([3.0, 1.0, 2.0], "addmm_activation", False)):
        fresh.clear()
        fresh.cache.path.unlink(missing_ok=True)
        it = iter(times)
        monkeypatch.setattr(dispatch, "default_timer", lambda device_type: (lambda fn: next(it)))
        with CustomOpRecorder() as rec:
            out = fused_linear(x, w, b, activation="gelu")
        assert bool(rec.ops) is fused
        (d,) = fresh.decisions().values()
        assert d.choice == winner and list(d.timings_ms) == ["torch", "addmm_activation", "triton"]
        torch.testing.assert_close(out, fused_linear_reference(x, w, b, activation="gelu"), rtol=1e-5, atol=1e-5)


def test_addmm_activation_gelu_form_on_cpu():
    """torch._addmm_activation(use_gelu=True) applies the erf GELU on CPU (tanh on CUDA: cuBLASLt's
    epilogue), which is why it is a candidate for "gelu" on CPU and "gelu_tanh" on CUDA only."""
    from uvit_fast.ops.fused_linear import _addmm_activation_form

    x, w, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    got = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    want = fused_linear_reference(x, w, b, activation=_addmm_activation_form("cpu"))
    torch.testing.assert_close(got, want)
    assert (got - fused_linear_reference(x, w, b, activation="gelu_tanh")).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_errors(device):
    x, w, b, r, g = _linear_inputs((2, 5), 8, 6, torch.float32, device, residual=True, gate="sample")
    with pytest.raises(ValueError, match=r"fused_linear: weight must have shape \(N, 8\) for x \(2, 5, 8\); got \(6, 7\)"):
        fused_linear(x, w[:, :7], b)
    with pytest.raises(ValueError, match=r"weight must have 2 dims; got shape \(6, 8, 1\)"):
        fused_linear(x, w[..., None], b)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\) but weight \(6, 8\) needs \(6,\)"):
        fused_linear(x, w, b[:5])
    with pytest.raises(ValueError, match=r"activation must be one of .*'quick_gelu'.*got 'relu'"):
        fused_linear(x, w, b, activation="relu")
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 5, 6\) for x \(2, 5, 8\); got \(2, 5, 5\)"):
        fused_linear(x, w, b, residual=r[..., :5])
    with pytest.raises(ValueError, match=r"gate must have shape \(B, N\) = \(2, 6\) \(per sample\) or the output's shape \(2, 5, 6\) \(per token\).*got \(3, 6\)"):
        fused_linear(x, w, b, gate=torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"gate must have shape the output's shape \(5, 6\) \(per token\) for x \(5, 8\); got \(1, 6\)"):
        fused_linear(x[0], w, b, gate=g[:1])
    with pytest.raises(TypeError, match=r"weight must have x's dtype \(torch.float32\) outside autocast; got torch.float16"):
        fused_linear(x, w.half(), b, backend="triton")
    with pytest.raises(TypeError, match=r"bias must have x's dtype \(torch.float32\) outside autocast; got torch.float16"):
        fused_linear(x, w, b.half(), backend="torch")
    with pytest.raises(TypeError, match=r"x must have a floating dtype; got torch.int64"):
        fused_linear(x.long(), w, b)
    with pytest.raises(TypeError, match=r"gate must be a torch.Tensor; got list"):
        fused_linear(x, w, b, gate=[1.0])
    with pytest.raises(ValueError, match=r"all tensors must be on one device.*weight on meta"):
        fused_linear(x, w.to("meta"), b)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fused_linear(x, w, b, backend="cuda")


def test_mlp_errors(device):
    x, w1, b1, w2, b2, r, g = _mlp_inputs((2, 5), 8, 16, 6, torch.float32, device, residual=True, gate="sample")
    with pytest.raises(ValueError, match=r"fused_mlp: fc1_weight must have shape \(N, 8\) for x \(2, 5, 8\); got \(16, 7\)"):
        fused_mlp(x, w1[:, :7], b1, w2, b2)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(N, 16\) for fc1_weight \(16, 8\); got \(6, 15\)"):
        fused_mlp(x, w1, b1, w2[:, :15], b2)
    with pytest.raises(ValueError, match=r"fc2_bias has shape \(5,\) but fc2_weight \(6, 16\) needs \(6,\)"):
        fused_mlp(x, w1, b1, w2, b2[:5])
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 5, 6\)"):
        fused_mlp(x, w1, b1, w2, b2, residual=torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"gate must have shape \(B, N\) = \(2, 6\)"):
        fused_mlp(x, w1, b1, w2, b2, gate=torch.randn(2, 16))
    with pytest.raises(TypeError, match=r"fc2_weight must have x's dtype \(torch.float32\) outside autocast; got torch.float16"):
        fused_mlp(x, w1, b1, w2.half(), b2)
    with pytest.raises(ValueError, match=r"activation must be one of"):
        fused_mlp(x, w1, b1, w2, b2, activation="gelu_erf")


# ---------------------------------------------------------------------------------------------
# uvit-fast bench rows
# ---------------------------------------------------------------------------------------------
def test_bench_rows():
    """``uvit-fast bench --op fused_linear``: fused_linear and fused_mlp rows at U-ViT-H/2 and
    DiT-XL/2 shapes, an auto row beside every Triton row, addmm_activation only where it computes
    the row's function (tanh GELU, forward), and every provider's function runs (tiny shapes here)."""
    from uvit_fast.bench import fused_linear as bench
    from uvit_fast.bench import runner

    assert "fused_linear" in runner.discover_op_modules()
    cases, reason = runner.load_cases("fused_linear", torch.device("cpu"), torch.float32)
    assert reason is None
    assert {c.op for c in cases} == {"fused_linear", "fused_mlp"}

    def rows(provider):
        return {(c.op, c.shape, c.pass_) for c in cases if c.provider == provider}

    assert rows("uvit_fast") and rows("uvit_fast_auto") == rows("uvit_fast") == rows("eager") == rows("linear")
    assert all(c.needs_cuda for c in cases if c.provider.startswith("uvit_fast"))
    addmm = [c for c in cases if c.provider == "addmm_activation"]
    assert addmm and all(c.pass_ == "fwd" and c.extra["activation"] == "gelu_tanh" and c.needs_cuda for c in addmm)
    assert any("U-ViT-H/2 fc1+gelu B=128 L=258 (M=33024, K=1152, N=4608)" == c.shape for c in cases)
    tiny = [bench._Spec("fused_linear", "fc2+res+gate", "tiny", 5, 72, 40, activation="gelu_tanh", residual=True,
                        gate=True, B=2),
            bench._Spec("fused_mlp", "mlp", "tiny", 5, 72, 40, H=96, activation="gelu", residual=True, B=2)]
    assert any(c.shape.endswith("fp32 residual stream)") for c in cases)  # the autocast-training rows
    stream = bench._Spec("fused_linear", "fc2+res", "tiny", 5, 72, 40, residual=True, stream32=True, B=2)
    for spec in tiny + [stream]:
        for provider in ("eager", "uvit_fast", "linear"):
            for pass_ in bench.PASSES:
                bench._make_fn(spec, provider, pass_, torch.device("cpu"), torch.float16 if spec.stream32 else torch.float32)()
        nbytes, flops = bench._cost(spec, torch.float32, "fwd")
        layers = [(72, 96), (96, 40)] if spec.op == "fused_mlp" else [(72, 40)]
        assert flops == sum(2 * 10 * k * n for k, n in layers) and nbytes > 0


def test_compile_with_auto_decides_when_the_graph_runs(fresh, monkeypatch, device):
    """Under torch.compile nothing is decided while tracing: the graph holds the run-time dispatch
    ops (uvit_fast.ops._runtime), which time the candidates when the graph first runs."""
    import torch._dynamo

    def timer_factory(device_type):
        assert not torch.compiler.is_compiling(), "timed while tracing"
        return lambda fn: (fn(), 1.0)[1]  # every candidate runs; ties keep PyTorch

    monkeypatch.setattr(dispatch, "default_timer", timer_factory)
    codes = []

    def backend(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    x, w1, b1, w2, b2, r, g = _mlp_inputs((2, 9), 72, 96, 40, torch.float32, device, residual=True, gate="sample")

    def f(x):
        y = fused_linear(x, w1, b1, activation="gelu")
        return fused_mlp(x, w1, b1, w2, b2, residual=r, gate=g) + y.sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend=backend)(x)
    expect = fused_mlp_reference(x, w1, b1, w2, b2, residual=r, gate=g) + fused_linear_reference(
        x, w1, b1, activation="gelu").sum()
    torch.testing.assert_close(out, expect)
    (code,) = codes
    assert "uvit_fast.fused_linear_dispatch" in code and "uvit_fast.fused_mlp_dispatch" in code
    assert sorted(k.split("[")[0] for k in fresh.decisions()) == ["fused_linear", "fused_mlp"]
    assert {d.choice for d in fresh.decisions().values()} == {"torch"}


def test_compile_takes_the_stored_triton_decision(fresh, monkeypatch, device):
    """A decision stored by an eager call (here with injected timings: triton fastest) is what the
    compiled graph runs, when it runs; nothing is timed again."""
    import torch._dynamo

    x, w, b, _, _ = _linear_inputs((2, 9), 72, 40, torch.float32, device)
    times = iter([3.0, 1.0])  # torch, triton (silu: no addmm_activation candidate)
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: (lambda fn: next(times)))
    fused_linear(x, w, b, activation="silu")
    assert [d.choice for d in fresh.decisions().values()] == ["triton"]
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed again"))
    launches = []
    real = fl._kernel

    class Spy:
        def __getattr__(self, name):
            launches.append(name)
            return getattr(real(), name)

    monkeypatch.setattr(fl, "_kernel", Spy)
    torch._dynamo.reset()
    out = torch.compile(lambda x: fused_linear(x, w, b, activation="silu"), fullgraph=True, backend="aot_eager")(x)
    assert "fused_linear_forward" in launches
    torch.testing.assert_close(out, fused_linear_reference(x, w, b, activation="silu"), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Random shapes (hypothesis; the example budget comes from tests/conftest.py's profile)
# ---------------------------------------------------------------------------------------------
@st.composite
def _linear_case(draw):
    B = draw(st.integers(1, 3), label="B")
    L = draw(st.sampled_from([1, 2, 5, 31, 33, 77, 129]), label="L")
    K = draw(st.sampled_from([1, 7, 32, 33, 72, 80, 96]), label="K")
    N = draw(st.sampled_from([1, 8, 31, 40, 65]), label="N")
    return dict(
        lead=(B, L), K=K, N=N,
        dtype=draw(st.sampled_from([torch.float32, torch.float16]), label="dtype"),
        bias=draw(st.booleans(), label="bias"),
        residual=draw(st.booleans(), label="residual"),
        gate=draw(st.sampled_from([None, "sample", "token"]), label="gate"),
        activation=draw(st.sampled_from(ACTIVATIONS), label="activation"),
        transposed_weight=draw(st.booleans(), label="transposed weight"),
    )


@pytest.mark.slow
@given(case=_linear_case())
def test_random_shapes_and_layouts(case):
    """M = B * L from 1 to 387 with tails against the 32-row tiles, K and N from 1 to 96 (partial
    K and column tiles, K = 1 with no full tile), every epilogue, optionally a column-major weight."""
    note(str(case))
    torch.manual_seed(0)
    x, w, b, r, g = _linear_inputs(case["lead"], case["K"], case["N"], case["dtype"], DEVICE, bias=case["bias"],
                                   residual=case["residual"], gate=case["gate"])
    if case["transposed_weight"]:
        w = w.t().contiguous().t()
    _check_linear(x, w, b, r, g, case["activation"])


@pytest.mark.parametrize("which", ["linear", "mlp"])
def test_empty_inner_dimension_on_the_kernels(which, device):
    """K = 0 (x of shape (..., 0)): the output is act(bias) (plus the epilogue), as in PyTorch; the rows
    were flattened with reshape(-1, 0), which is ambiguous, and raised (found by the review)."""
    x = torch.randn(2, 3, 0, device=device, requires_grad=True)
    if which == "linear":
        w, b = torch.randn(5, 0, device=device, requires_grad=True), torch.randn(5, device=device, requires_grad=True)
        args, fn, ref = (x, w, b), fused_linear, fused_linear_reference
        kw = dict(activation="gelu")
    else:
        w1, w2 = torch.randn(4, 0, device=device, requires_grad=True), torch.randn(5, 4, device=device, requires_grad=True)
        args, fn, ref = (x, w1, None, w2, None), fused_mlp, fused_mlp_reference
        kw = dict(residual=torch.randn(2, 3, 5, device=device))
    out = fn(*args, **kw, backend="triton")
    expected = ref(*args, **kw)
    torch.testing.assert_close(out, expected)
    wrt = [t for t in args if t is not None]
    for g, e in zip(torch.autograd.grad(out.sum(), wrt), torch.autograd.grad(expected.sum(), wrt)):
        torch.testing.assert_close(g, e)
