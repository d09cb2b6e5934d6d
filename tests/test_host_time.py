"""The per-call hot path (uvit_fast.ops._hot): a plan per call signature, taken once, then looked up.

What a decided call runs is checked by tracing its Python calls (sys.setprofile), not by timing:
the host figures themselves are the benchmark's (`uvit-fast bench --suite sampling`, docs/profiling.md).
"""
import importlib
import sys

import numpy as np
import pytest
import torch

import uvit_fast
from uvit_fast import dispatch, ops
from uvit_fast.ops import _hot, adaln

attn_mod = importlib.import_module("uvit_fast.ops.attention")  # `uvit_fast.ops.attention` is also the function
fl_mod = importlib.import_module("uvit_fast.ops.fused_linear")
from uvit_fast.testing import CustomOpRecorder


def _adaln_args(dtype=torch.float32, B=1, L=7, D=72):
    x = torch.randn(B, L, D, dtype=dtype)
    return x, torch.randn(B, D, dtype=dtype), torch.randn(B, D, dtype=dtype), torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)


def _calls(fn):
    """The (file, function) of every Python frame entered while ``fn()`` runs, and the builtins called."""
    seen = []

    def prof(frame, event, arg):
        if event == "call":
            seen.append((frame.f_code.co_filename, frame.f_code.co_name))
        elif event == "c_call":
            seen.append(("<builtin>", getattr(arg, "__qualname__", getattr(arg, "__name__", str(arg)))))

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


_OPS = {
    "adaln_layer_norm": lambda a: ops.adaln_layer_norm(*a, 1e-6, 1.0),
    "residual_adaln_layer_norm": lambda a: ops.residual_adaln_layer_norm(a[0], a[0] * 2, a[1], a[1], a[2], a[3], a[4], 1e-6, 1.0),
    "fused_linear": lambda a: ops.fused_linear(a[0], torch.ones(40, 72), torch.ones(40), activation="gelu"),
    "fused_mlp": lambda a: ops.fused_mlp(a[0], torch.ones(96, 72), None, torch.ones(72, 96), None, residual=a[0]),
    "attention": lambda a: ops.attention(*(a[0].view(1, 7, 2, 36),) * 3),
    "attention_qkvpacked": lambda a: ops.attention_qkvpacked(torch.cat([a[0]] * 3, -1).view(1, 7, 3, 2, 36)),
    "skip_concat_linear": lambda a: ops.skip_concat_linear(a[0], a[0], torch.ones(72, 144), a[3]),
    "patchify_embed": lambda a: ops.patchify_embed(a[0].view(1, 2, 14, 18), torch.ones(8, 2, 2, 2), None),
    "decoder_unpatchify": lambda a: ops.decoder_unpatchify(a[0].view(1, 6, 84)[:, :4], torch.ones(8, 84), None, patch_size=2, grid=(2, 2)),
}


@pytest.mark.parametrize("name", list(_OPS))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_a_decided_call_runs_no_checks_no_key_and_reads_no_environment(fresh, name, backend):
    """UVIT_FAST_TUNE=1 under the interpreter: the first call measures (the interpreter loses); a
    second call of the same signature enters only the op, the plan lookup and the chosen candidate."""
    args = _adaln_args()
    call = _OPS[name]
    with torch.no_grad(), uvit_fast.use_backend(backend):
        first = call(args)
        seen = _calls(lambda: call(args))
        again = call(args)
    for a, e in zip(first if isinstance(first, tuple) else (first,), again if isinstance(again, tuple) else (again,)):
        assert torch.equal(a, e)
    files = {f for f, _ in seen}
    funcs = {fn for _, fn in seen}
    for module in ("dispatch.py", "_backend.py", "_checks.py", "_runtime.py"):
        assert not any(f.endswith(module) for f in files), (module, sorted(funcs))
    assert not any("importlib" in f or f.endswith("os.py") or f == "<frozen os>" for f in files), sorted(files)
    assert not {"getenv", "get_device_name", "format", "measure", "make_key", "resolve", "autocast_dtype"} & funcs, sorted(funcs)
    if backend == "auto" and name not in ("attention", "attention_qkvpacked"):
        assert dispatch.dispatcher().decisions(), "the first call measured"


def test_a_plan_is_made_once_per_signature_and_again_for_a_new_one(fresh, monkeypatch):
    made = []
    real = adaln._adaln_plan
    monkeypatch.setattr(adaln, "_adaln_plan", lambda *a: made.append(a[0].shape) or real(*a))
    x, sh, sc, w, b = _adaln_args()
    with torch.no_grad():
        for _ in range(3):
            ops.adaln_layer_norm(x, sh, sc, w, b)
        assert len(made) == 1
        ops.adaln_layer_norm(x[:, :5], sh, sc, w, b)  # another shape
        ops.adaln_layer_norm(x.double(), sh.double(), sc.double(), w.double(), b.double())  # another dtype
        ops.adaln_layer_norm(x, sh, sc, w, b, eps=1e-3)  # another static argument
        ops.adaln_layer_norm(x, sh, sc, w, b, backend="torch")
        ops.adaln_layer_norm(x, None, None, w, b)  # absent modulation
    assert len(made) == 6
    ops.adaln_layer_norm(x, sh, sc, w.requires_grad_(), b)  # grad mode and an input requiring grad: training
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ops.adaln_layer_norm(x, sh, sc, w, b)
    assert len(made) == 8
    ops.adaln_layer_norm(x, sh, sc, w, b)
    assert len(made) == 8


def test_process_wide_changes_drop_the_plans(fresh):
    """use_backend, tune()'s forced measuring and the decision table clearing all refresh."""
    x, sh, sc, w, b = _adaln_args()
    with torch.no_grad():
        ops.adaln_layer_norm(x, sh, sc, w, b)  # measured (timing both candidates): the interpreter loses
        with CustomOpRecorder() as rec:
            ops.adaln_layer_norm(x, sh, sc, w, b)
        assert not rec.ops
        with uvit_fast.use_backend("triton"), CustomOpRecorder() as rec:
            ops.adaln_layer_norm(x, sh, sc, w, b)
        assert rec.ops == {"uvit_fast.adaln_layer_norm.default"}
        with CustomOpRecorder() as rec:
            ops.adaln_layer_norm(x, sh, sc, w, b)
        assert not rec.ops
        # a decision installed from elsewhere (a tune() broadcast) reaches the next call
        key = next(iter(fresh.decisions()))
        decision = fresh.decisions()[key]
        fresh.install({key: dispatch.Decision(key, "triton", decision.timings_ms)})
        with CustomOpRecorder() as rec:
            ops.adaln_layer_norm(x, sh, sc, w, b)
        assert rec.ops == {"uvit_fast.adaln_layer_norm.default"}
        fresh.clear()
        with dispatch.forced() as keys:
            ops.adaln_layer_norm(x, sh, sc, w, b)
        assert keys == [key]


def test_refresh_settings_reads_the_environment_again(monkeypatch):
    x, sh, sc, w, b = _adaln_args()
    monkeypatch.setenv("UVIT_FAST_BACKEND", "torch")
    uvit_fast.refresh_settings()
    with torch.no_grad(), CustomOpRecorder() as rec:
        ops.adaln_layer_norm(x, sh, sc, w, b)
        monkeypatch.setenv("UVIT_FAST_BACKEND", "triton")
        ops.adaln_layer_norm(x, sh, sc, w, b)
        assert not rec.ops  # the plan stands until the settings are refreshed
        uvit_fast.refresh_settings()
        ops.adaln_layer_norm(x, sh, sc, w, b)
    assert rec.ops == {"uvit_fast.adaln_layer_norm.default"}


def test_bad_input_after_a_good_plan_still_gets_its_error():
    x, sh, sc, w, b = _adaln_args()
    ops.adaln_layer_norm(x, sh, sc, w, b)
    with pytest.raises(ValueError, match=r"adaln_layer_norm: shift must have shape \(1, 72\)"):
        ops.adaln_layer_norm(x, sh[:, :5], sc, w, b)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        ops.adaln_layer_norm(x, sh, sc, w, b, eps=[1e-5])  # unhashable: no signature, full checks
    with pytest.raises(TypeError, match="x must be a torch.Tensor; got list"):
        ops.adaln_layer_norm([[1.0]], sh, sc, w, b)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.attention(*(x.view(1, 7, 2, 36),) * 3, backend="cuda")


def test_plans_are_bounded():
    plans = _hot.Plans("t", maxsize=3)
    x = torch.randn(2)
    for n in range(5):
        sig, plan = plans.lookup(n, x)
        assert plan is None
        plans.put(sig, len)
    assert len(plans) <= 3
    assert plans.lookup(4, x)[1] is len


def test_inference_plans_call_the_kernel_without_the_dispatcher_unless_watched(monkeypatch):
    """An inference call of the Triton path runs the op's body (the launcher) directly; with a
    TorchDispatchMode active (FlopCounterMode, fake tensors, CustomOpRecorder) it goes through the op."""
    x, sh, sc, w, b = _adaln_args()
    direct = adaln._ADALN_DIRECT
    bodies = []
    monkeypatch.setattr(direct, "body", lambda *a: bodies.append(1) or adaln._adaln_op._init_fn(*a))
    ref = ops.adaln_layer_norm_reference(x, sh, sc, w, b)
    with torch.no_grad(), uvit_fast.use_backend("triton"):
        with CustomOpRecorder() as rec:
            y1 = ops.adaln_layer_norm(x, sh, sc, w, b)
        assert rec.ops == {"uvit_fast.adaln_layer_norm.default"} and not bodies
        y2 = ops.adaln_layer_norm(x, sh, sc, w, b)
        assert bodies == [1]
    torch.testing.assert_close(y1, ref)
    assert torch.equal(y1, y2)


def test_training_plans_keep_the_op_and_its_backward():
    x, sh, sc, w, b = (t.requires_grad_() for t in _adaln_args())
    with uvit_fast.use_backend("triton"):
        y = ops.adaln_layer_norm(x, sh, sc, w, b)
        y2 = ops.adaln_layer_norm(x, sh, sc, w, b)  # the stored plan
    ref = ops.adaln_layer_norm_reference(x, sh, sc, w, b)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y2, (x, sh, sc, w, b), g)
    want = torch.autograd.grad(ref, (x, sh, sc, w, b), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert y.grad_fn is not None


def test_nothing_is_timed_or_stored_while_a_stream_is_capturing(fresh, monkeypatch):
    """A key first seen while torch.cuda.is_current_stream_capturing() says True runs PyTorch,
    untimed and undecided, and stores no plan: after the capture, the next call measures."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed while capturing"))
    x, sh, sc, w, b = _adaln_args()
    with torch.no_grad():
        y = ops.adaln_layer_norm(x, sh, sc, w, b)
        ops.adaln_layer_norm(x, sh, sc, w, b)
    torch.testing.assert_close(y, ops.adaln_layer_norm_reference(x, sh, sc, w, b))
    assert fresh.decisions() == {} and len(adaln._ADALN_PLANS) == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: lambda fn: (fn(), 1.0)[1])
    with torch.no_grad():
        ops.adaln_layer_norm(x, sh, sc, w, b)
    assert len(fresh.decisions()) == 1 and len(adaln._ADALN_PLANS) == 1


def test_a_stored_decision_still_runs_while_capturing(fresh, monkeypatch):
    x, sh, sc, w, b = _adaln_args()
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: lambda fn: (fn(), 1.0)[1])
    with torch.no_grad():
        ops.fused_linear(x, torch.ones(40, 72), torch.ones(40), activation="gelu")  # decided: torch wins the tie
        uvit_fast.refresh_settings()
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed while capturing"))
        key = next(iter(fresh.decisions()))
        fresh.install({key: dispatch.Decision(key, "triton", fresh.decisions()[key].timings_ms)})
        with CustomOpRecorder() as rec:
            ops.fused_linear(x, torch.ones(40, 72), torch.ones(40), activation="gelu")
    assert rec.ops == {"uvit_fast.fused_linear.default"}


def test_compiled_dispatch_op_does_not_time_while_capturing(fresh, monkeypatch):
    """The run-time dispatch op (what torch.compile's cudagraph trees capture) obeys the same rule."""
    from uvit_fast.ops._runtime import _PINNED

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed while capturing"))
    x, sh, sc, w, b = _adaln_args()
    args = (x, sh, sc, w, b, 1e-6, 1.0, torch.float32)
    out = adaln._ADALN_DISPATCH(*args, key_op="adaln_layer_norm[t]", training=False, rows=7, dims=[72])
    torch.testing.assert_close(out[0], ops.adaln_layer_norm_reference(x, sh, sc, w, b, 1e-6, 1.0))
    assert fresh.decisions() == {} and not _PINNED


def test_host_aware_timer_takes_the_slower_of_device_and_loop(monkeypatch):
    monkeypatch.setattr(dispatch, "cuda_loop_timer", lambda fn: 0.5)
    monkeypatch.setattr(dispatch, "cuda_timer", lambda fn: 0.2)
    assert dispatch.decision_timer("cuda", training=False)(lambda: None) == 0.5
    assert dispatch.decision_timer("cuda", training=True)(lambda: None) == 0.2
    monkeypatch.setattr(dispatch, "cuda_timer", lambda fn: 0.9)
    assert dispatch.decision_timer("cuda", training=False)(lambda: None) == 0.9
    assert dispatch.decision_timer("cpu", training=False) is dispatch.cpu_timer


def test_attention_plan_follows_the_tf32_setting_on_cuda(monkeypatch):
    """Untimed auto picks SDPA or the kernel for fp32 CUDA inputs by the TF32 setting: part of the signature."""
    class FakeCuda:
        dtype = torch.float32
        is_cuda = True

    monkeypatch.setattr(attn_mod, "tf32_matmul_allowed", lambda: True)
    assert attn_mod._tf32_state(FakeCuda()) is True
    monkeypatch.setattr(attn_mod, "tf32_matmul_allowed", lambda: False)
    assert attn_mod._tf32_state(FakeCuda()) is False
    assert attn_mod._tf32_state(torch.randn(1)) is False  # CPU: no TF32, nothing read


def test_fused_linear_plans_key_the_activation(fresh):
    x = torch.randn(1, 7, 72)
    w, b = torch.randn(40, 72), torch.randn(40)
    with torch.no_grad():
        y_gelu = ops.fused_linear(x, w, b, activation="gelu")
        y_silu = ops.fused_linear(x, w, b, activation="silu")
    torch.testing.assert_close(y_gelu, fl_mod.fused_linear_reference(x, w, b, activation="gelu"))
    torch.testing.assert_close(y_silu, fl_mod.fused_linear_reference(x, w, b, activation="silu"))


_TUNED = []


def _tuned_kernel(hooks):
    """A one-config autotuned copy kernel whose config has a pre-hook (as the TMA configs do)."""
    import triton
    import triton.language as tl

    if not _TUNED:
        @triton.autotune(configs=[triton.Config({"BLOCK": 16}, pre_hook=lambda nargs: hooks.append(nargs["n"]))],
                         key=["n"])
        @triton.jit
        def copy(X, Y, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

        _TUNED.append(copy)
    return _TUNED[0]


def test_an_autotuned_launch_resolves_its_config_once_per_signature(monkeypatch):
    """kernels._utils.launch: the autotuner runs on a signature's first launch only; later launches
    call the tuned function with the remembered config, still running its pre-hook."""
    from triton.runtime.autotuner import Autotuner

    from uvit_fast.kernels._utils import launch

    hooks, runs = [], []
    kernel = _tuned_kernel(hooks)
    real = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    x = torch.randn(37)
    outs = []
    for n in (37, 37, 37, 20):
        y = torch.full_like(x, float("nan"))
        launch(kernel, lambda meta: (triton_cdiv(n, meta["BLOCK"]),), x, y, n)
        outs.append(y)
    assert len(runs) == 2  # n=37 once, n=20 (another signature) once
    assert hooks == [37, 37, 37, 20]
    torch.testing.assert_close(outs[1], x * 2)
    torch.testing.assert_close(outs[3][:20], x[:20] * 2)
    assert outs[3][20:].isnan().all()


def triton_cdiv(a, b):
    return -(-a // b)


def test_fused_linear_launches_skip_the_autotuner_after_the_first(monkeypatch):
    from triton.runtime.autotuner import Autotuner

    runs = []
    real = Autotuner.run
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: runs.append(self.base_fn.__name__) or real(self, *a, **k))
    x, w, b = torch.randn(1, 11, 72), torch.randn(24, 72), torch.randn(24)  # a signature no other test launches
    with torch.no_grad(), uvit_fast.use_backend("triton"):
        y1 = ops.fused_linear(x, w, b, activation="gelu")
        assert runs == ["_fused_linear_fwd_kernel"]
        y2 = ops.fused_linear(x, w, b, activation="gelu")
    assert runs == ["_fused_linear_fwd_kernel"]
    assert torch.equal(y1, y2)


def test_mlp_routing_is_cached_per_module_and_follows_changes():
    """layers.mlp_parts answers from a per-module cache, and sees a hook, a train/eval switch with
    active dropout, or a replaced child made after its first answer."""
    from uvit_fast import layers

    mlp = layers.Mlp(16, 32)
    mlp.drop = torch.nn.Dropout(0.1)  # timm's Mlp child name
    mlp.eval()
    parts = layers.mlp_parts(mlp)
    assert parts is not None and parts[0] is mlp.fc1 and layers.mlp_parts(mlp) == parts
    mlp.train()  # dropout active: not a plain fc1-act-fc2
    assert layers.mlp_parts(mlp) is None
    mlp.eval()
    assert layers.mlp_parts(mlp) == parts
    handle = mlp.fc2.register_forward_hook(lambda *a: None)
    assert layers.mlp_parts(mlp) is None
    handle.remove()
    assert layers.mlp_parts(mlp) == parts
    mlp.fc1 = torch.nn.Linear(16, 32)
    assert layers.mlp_parts(mlp)[0] is mlp.fc1
    mlp.act = torch.nn.Tanh()  # an activation the kernels do not compute
    assert layers.mlp_parts(mlp) is None


def test_a_tensor_subclass_goes_through_the_op_not_the_direct_launch():
    """A subclass with its own __torch_dispatch__ (TwoTensor here; DTensor, torchao's) meets a stored
    inference plan of plain tensors with the same metadata: the Triton call must dispatch through the
    op, not hand the subclass to the launcher (found by review: a data-pointer error)."""
    from torch.testing._internal.two_tensor import TwoTensor

    x = torch.randn(1, 4, 16)
    with torch.no_grad(), uvit_fast.use_backend("triton"):
        plain = ops.adaln_layer_norm(x)
        both = ops.adaln_layer_norm(TwoTensor(x, x * 2))
    assert isinstance(both, TwoTensor)
    torch.testing.assert_close(both.a, plain)
    torch.testing.assert_close(both.b, ops.adaln_layer_norm_reference(x * 2), rtol=1e-5, atol=1e-5)


def test_a_plan_made_across_an_invalidation_is_not_stored():
    """A plan built while another thread refreshes the settings (leaving a use_backend block) keeps
    the generation it was looked up under: it is not stored for the calls after the refresh."""
    x = torch.randn(1, 4, 16)
    sig, plan = adaln._ADALN_PLANS.lookup(("auto", 1e-5, 1.0, float, float), x, None, None, None, None)
    assert plan is None
    uvit_fast.refresh_settings()  # meanwhile, elsewhere
    adaln._ADALN_PLANS.put(sig, lambda *a: pytest.fail("a stale plan ran"))
    assert len(adaln._ADALN_PLANS) == 0
    with torch.no_grad():
        torch.testing.assert_close(ops.adaln_layer_norm(x), ops.adaln_layer_norm_reference(x))


def test_a_float_patch_size_is_checked_even_after_an_int_one():
    t, w = torch.randn(1, 4, 16), torch.randn(16, 16)
    ops.decoder_unpatchify(t, w, None, patch_size=2, grid=(2, 2))
    with pytest.raises(TypeError, match="decoder_unpatchify: patch_size must be an int or a sequence of 2 ints; got 2.0"):
        ops.decoder_unpatchify(t, w, None, patch_size=2.0, grid=(2, 2))


def test_recent_signatures_are_matched_by_a_tensor_guard(fresh):
    """The last few signatures of an op are checked by a C-level tensor guard before the dict:
    a repeat call hits it; what it does not cover (another None position, strides, grad mode,
    autocast, a device) falls to the full signature and still gets the right plan."""
    x, sh, sc, w, b = _adaln_args()
    plans = adaln._ADALN_PLANS
    statics = ("auto", 1e-6, 1.0, float, float)
    with torch.no_grad():
        for args in ((x, sh, sc, w, None), (x, sh, sc, None, b)):  # the same shapes, None moved
            torch.testing.assert_close(ops.adaln_layer_norm(*args, 1e-6, 1.0),
                                       ops.adaln_layer_norm_reference(*args, 1e-6, 1.0))
            assert plans.lookup(statics, *args)[0] is _hot._HIT
        sig, plan = plans.lookup(statics, x, sh, sc, b, None)  # b for w: the same shape, the same guard
        assert sig is _hot._HIT
        t = torch.randn(72, 7).t().unsqueeze(0)  # x's shape, other strides: the dict's plan
        sig, plan = plans.lookup(statics, t, sh, sc, w, None)
        assert sig is not _hot._HIT and plan is not None
        torch.testing.assert_close(ops.adaln_layer_norm(t, sh, sc, w, None, 1e-6, 1.0),
                                   ops.adaln_layer_norm_reference(t, sh, sc, w, None, 1e-6, 1.0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert plans.lookup(statics, x, sh, sc, w, None)[0] is not _hot._HIT
        assert plans.lookup(statics, x.to("meta"), sh, sc, w, None)[1] is None  # another device
        assert plans.lookup(("auto", 1e-5, 1.0, float, float), x, sh, sc, w, None)[1] is None  # another eps
    assert plans.lookup(statics, x, sh, sc, w, None)[0] is not _hot._HIT  # grad mode on
    uvit_fast.refresh_settings()
    with torch.no_grad():
        assert plans.lookup(statics, x, sh, sc, w, None)[1] is None  # invalidated: guards dropped too


def test_the_dict_alone_still_serves_where_no_guard_can_be_built(fresh, monkeypatch):
    monkeypatch.setattr(_hot, "_TensorGuards", None)
    x, sh, sc, w, b = _adaln_args()
    with torch.no_grad():
        first = ops.adaln_layer_norm(x, sh, sc, w, b, 1e-6, 1.0)
        sig, plan = adaln._ADALN_PLANS.lookup(("auto", 1e-6, 1.0, float, float), x, sh, sc, w, b)
        assert sig is not _hot._HIT and plan is not None
        torch.testing.assert_close(ops.adaln_layer_norm(x, sh, sc, w, b, 1e-6, 1.0), first, rtol=0, atol=0)


def test_calls_with_several_nones_are_guarded_but_one_tensor_twice_is_not():
    x, sh, sc, w, b = _adaln_args()
    assert _hot._tensor_guard((x, None, None, w, b)) is not None  # a LayerNorm call: the None positions are checked apart
    assert _hot._tensor_guard((x, None, None, None, None)) is not None
    assert _hot._tensor_guard((x, sh, sh, w, b)) is None  # the guard rejects aliased arguments: the dict serves it
    plans = adaln._ADALN_PLANS
    with torch.no_grad():
        for args in ((x, None, None, w, b), (x, sh, sh, w, b)):
            torch.testing.assert_close(ops.adaln_layer_norm(*args, 1e-6, 1.0), ops.adaln_layer_norm_reference(*args, 1e-6, 1.0))
        statics = ("auto", 1e-6, 1.0, float, float)
        assert plans.lookup(statics, x, None, None, w, b)[0] is _hot._HIT
        sig, plan = plans.lookup(statics, x, sh, sh, w, b)
        assert sig is not _hot._HIT and plan is not None


def test_a_refresh_between_the_check_and_the_store_leaves_no_stale_plan(monkeypatch):
    """Another thread refreshing the settings (leaving a use_backend block) while ``put`` stores:
    the plan made under the old settings must never run after the refresh."""
    x = torch.randn(1, 4, 16)
    plans = adaln._ADALN_PLANS
    statics = ("auto", 1e-5, 1.0, float, float)
    sig, plan = plans.lookup(statics, x, None, None, None, None)
    assert plan is None

    def other_thread_refreshes():  # runs inside put(), after its generation check
        uvit_fast.refresh_settings()
        plans.lookup(statics, x, None, None, None, None)  # the table adopts the new generation
        return False

    monkeypatch.setattr(_hot, "stream_capturing", other_thread_refreshes)
    plans.put(sig, lambda *a: pytest.fail("a stale plan ran"))
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(ops.adaln_layer_norm(x), ops.adaln_layer_norm_reference(x))
        torch.testing.assert_close(ops.adaln_layer_norm(x), ops.adaln_layer_norm_reference(x))


def test_fake_tensors_are_not_timed_and_leave_no_plan(fresh):
    """A first call under FakeTensorMode (torch.export, a FLOP count on fake inputs) would time
    Python overhead, not compute: it runs PyTorch undecided, stores no decision and no plan."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        h, s, w, b = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(16, 32), torch.randn(16)
        with torch.no_grad():
            out = ops.skip_concat_linear(h, s, w, b)
    assert out.shape == (2, 5, 16)
    assert not fresh.decisions()
    skip_mod = importlib.import_module("uvit_fast.ops.skip_linear")
    assert len(skip_mod._PLANS) == 0
    h, s, w, b = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(16, 32), torch.randn(16)
    with torch.no_grad():
        torch.testing.assert_close(ops.skip_concat_linear(h, s, w, b), ops.skip_concat_linear_reference(h, s, w, b))
    assert fresh.decisions()  # the real call measured


def test_meta_tensors_and_jit_trace_go_through_the_op():
    """The direct launch is for real tensors in eager calls: on meta the op's fake implementation
    runs, and torch.jit.trace records the op (not the kernel's output allocation)."""
    h, s, w = torch.randn(2, 4, 8, device="meta"), torch.randn(2, 4, 8, device="meta"), torch.randn(12, 16, device="meta")
    with torch.no_grad():
        assert ops.skip_concat_linear(h, s, w, backend="triton").shape == (2, 4, 12)
    assert ops.skip_concat_linear(h, s, w.requires_grad_(), backend="triton").shape == (2, 4, 12)
    x = torch.randn(1, 7, 72)
    with torch.no_grad():
        ops.adaln_layer_norm(x, backend="triton")  # a stored inference plan on the direct path
        traced = torch.jit.trace(lambda t: ops.adaln_layer_norm(t, backend="triton"), (x,))
    assert "uvit_fast::adaln_layer_norm" in str(traced.graph)
    torch.testing.assert_close(traced(x), ops.adaln_layer_norm_reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("first, again, match", [
    (lambda a: ops.adaln_layer_norm(a[0], eps=0.5), lambda a: ops.adaln_layer_norm(a[0], eps=np.float32(0.5)),
     r"adaln_layer_norm: eps must be a non-negative number; got np.float32\(0.5\)"),
    (lambda a: ops.attention(*(a[0].view(1, 7, 2, 36),) * 3, scale=0.5),
     lambda a: ops.attention(*(a[0].view(1, 7, 2, 36),) * 3, scale=np.float32(0.5)),
     r"attention: scale must be a float or None; got float32"),
    (lambda a: ops.decoder_unpatchify(a[0].view(1, 6, 84)[:, :5], torch.ones(8, 84), None, patch_size=2, grid=(2, 2), extras=1),
     lambda a: ops.decoder_unpatchify(a[0].view(1, 6, 84)[:, :5], torch.ones(8, 84), None, patch_size=2, grid=(2, 2), extras=True),
     r"decoder_unpatchify: extras must be a non-negative int; got True"),
])
def test_a_non_tensor_argument_of_another_type_is_checked_after_a_good_call(first, again, match):
    """2.0, True and np.float32(0.5) equal 2, 1 and 0.5 and hash alike: signatures hold their types."""
    args = _adaln_args()
    with torch.no_grad():
        first(args)
        with pytest.raises((TypeError, ValueError), match=match):
            again(args)
