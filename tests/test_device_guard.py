"""Every kernel launcher runs under its inputs' device (kernels/_utils.device_guard).

Triton launches on the *current* CUDA device; a model on ``cuda:1`` while ``cuda:0`` is current
would fail at every launch without the guard (issue 12, section 4). On CPU the guard is recorded
(monkeypatched) while every op runs forward and backward on the Triton backend under the
interpreter; with two GPUs the ops run for real on ``cuda:1``.
"""
import contextlib
import sys

import pytest
import torch

from uvit_fast.ops import (
    adaln_layer_norm,
    attention,
    attention_qkvpacked,
    decoder_unpatchify,
    patchify_embed,
    residual_adaln_layer_norm,
    skip_concat_linear,
)

LAUNCHERS = {
    "attention": {"attention_forward", "attention_backward", "attention_qkvpacked_backward"},
    "skip_concat_linear": {"skip_concat_linear_forward", "skip_concat_linear_backward_input",
                           "skip_concat_linear_backward_weight"},
    "adaln_layer_norm": {"_forward", "adaln_layer_norm_backward"},
    "patchify_embed": {"patchify_embed_forward", "patchify_embed_backward"},
    "decoder_unpatchify": {"decoder_unpatchify_forward", "decoder_unpatchify_backward"},
}


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _run_every_op(device, dtype=torch.float32):
    """Forward and backward of every op on the Triton backend; returns the outputs and grads."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return _leaf(torch.randn(*shape, generator=g, dtype=dtype).to(device))

    results = []
    q, k, v = r(1, 20, 2, 16), r(1, 20, 2, 16), r(1, 20, 2, 16)
    results.append(((q, k, v), attention(q, k, v, causal=True, backend="triton")))
    qkv = r(1, 20, 3, 2, 16)
    results.append(((qkv,), attention_qkvpacked(qkv, backend="triton")))
    h, s, w, b = r(1, 9, 16), r(1, 9, 16), r(24, 32), r(24)
    results.append(((h, s, w, b), skip_concat_linear(h, s, w, b, backend="triton")))
    x, shift, scale, lw, lb = r(2, 9, 16), r(2, 16), r(2, 16), r(16), r(16)
    results.append(((x, shift, scale, lw, lb), adaln_layer_norm(x, shift, scale, lw, lb, backend="triton")))
    xr, br, gate = r(2, 9, 16), r(2, 9, 16), r(2, 16)
    results.append(((xr, br, gate), residual_adaln_layer_norm(xr, br, gate, shift, scale, lw, lb, backend="triton")))
    img, pw, pb = r(2, 3, 8, 8), r(16, 3, 4, 4), r(16)
    results.append(((img, pw, pb), patchify_embed(img, pw, pb, backend="triton")))
    tok, dw, db = r(2, 4, 16), r(4 * 4 * 3, 16), r(4 * 4 * 3)
    results.append(((tok, dw, db), decoder_unpatchify(tok, dw, db, patch_size=4, grid=(2, 2), backend="triton")))
    grads = []
    outs = []
    for inputs, y in results:
        ys = y if isinstance(y, tuple) else (y,)
        grads.append(torch.autograd.grad(sum(t.float().square().sum() for t in ys), inputs))
        outs.extend(ys)
    return outs, grads


def test_guard_enters_the_tensors_cuda_device_and_is_a_no_op_on_cpu():
    from uvit_fast.kernels import _utils

    assert isinstance(_utils.device_guard(torch.zeros(1)), contextlib.nullcontext)

    class FakeCudaTensor:  # no GPU here: only the guard's choice is checked, it is not entered
        device = torch.device("cuda", 1)

    guard = _utils.device_guard(FakeCudaTensor())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.slow  # about 9 s: every op forward and backward under the interpreter
def test_every_launcher_goes_through_the_guard_with_the_inputs_device(monkeypatch):
    from uvit_fast.kernels import _utils

    calls = []

    def recording_guard(t):
        launcher = sys._getframe(1).f_locals["launcher"]  # the on_inputs_device wrapper's frame
        calls.append((launcher.__module__.rsplit(".", 1)[-1], launcher.__name__, t.device))
        return contextlib.nullcontext()

    monkeypatch.setattr(_utils, "device_guard", recording_guard)
    _run_every_op(torch.device("cpu"))
    seen = {}
    for module, name, dev in calls:
        assert dev == torch.device("cpu"), (module, name, dev)
        seen.setdefault(module, set()).add(name)
    for module, names in LAUNCHERS.items():
        assert names <= seen.get(module, set()), f"{module}: launchers {names - seen.get(module, set())} not guarded"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (inputs on cuda:1 while cuda:0 is current)")
def test_every_op_runs_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    dev1 = torch.device("cuda", 1)
    outs1, grads1 = _run_every_op(dev1)
    torch.cuda.synchronize(dev1)
    assert torch.cuda.current_device() == 0
    outs0, grads0 = _run_every_op(torch.device("cuda", 0))
    for a, b in zip(outs1, outs0):
        assert a.device == dev1
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-4)
    for ga, gb in zip(grads1, grads0):
        for a, b in zip(ga, gb):
            assert a.device == dev1
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-4)
