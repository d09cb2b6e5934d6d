"""Kernel launches per forward (``uvit-fast profile``'s ``launches_fused`` / ``launches_plain``),
counted on meta by :func:`uvit_fast.profiler.count_launches`, checked against real runs: the fused
model forward on CPU tensors with every fused op on its Triton kernel (the interpreter), counting
each real ``kernel[grid](...)`` launch, and the plain model forward counted by the same dispatch
mode. Shrunk models (width 64, 2 heads, depth 2, few tokens) so that the interpreter is quick."""
import os

import pytest
import torch

import uvit_fast
import uvit_fast._backend
from uvit_fast import profiler
from uvit_fast.models import create_model

# name -> create_model overrides (shrunk: the count does not depend on the width)
SMALL = {
    "DiT-S/8": dict(input_size=16, hidden_size=64, num_heads=2, depth=2),
    "cifar10_uvit_small": dict(img_size=8, patch_size=4, embed_dim=64, num_heads=2, depth=2),
}


def _refresh():
    refresh = getattr(uvit_fast._backend, "refresh_settings", None)  # rereads UVIT_FAST_POISON
    if refresh is not None:
        refresh()


@pytest.fixture
def no_poison():
    # poisoned outputs (the suite's UVIT_FAST_POISON=1) add a fill_ inside every launcher: not the
    # model's. The launchers read the variable once: refresh on the way in and on the way out
    old = os.environ.get("UVIT_FAST_POISON")
    os.environ["UVIT_FAST_POISON"] = "0"
    _refresh()
    yield
    if old is None:
        os.environ.pop("UVIT_FAST_POISON", None)
    else:
        os.environ["UVIT_FAST_POISON"] = old
    _refresh()
    uvit_fast.refresh_settings()  # the launchers read it once (the next test's refresh reads it back)


def _real_count(name, fused):
    model = create_model(name, fused=fused, **SMALL[name]).eval()
    inputs = model.example_inputs(1)
    counter = profiler.LaunchCounter(inner=True)
    with profiler.TritonLaunches() as triton_launches:
        if fused:
            with uvit_fast.use_backend("triton"), torch.no_grad(), counter:
                out = model(*inputs)
        else:
            with torch.no_grad(), counter:
                out = model(*inputs)
    assert torch.isfinite(out).all()
    return counter, triton_launches


@pytest.mark.parametrize("name", [n if n.startswith("DiT") else pytest.param(n, marks=pytest.mark.slow) for n in sorted(SMALL)])
def test_fused_count_matches_real_triton_launches(name, no_poison):
    meta = profiler.count_launches(name, fused=True, dtype=torch.float32, device_type="cpu", **SMALL[name])
    counter, launches = _real_count(name, fused=True)
    assert meta["unknown"] == {} and counter.unknown == {}
    assert launches.n > 0
    assert meta["triton"] == launches.n == counter.triton, (meta["by_op"], launches.names)
    assert meta["by_op"] == counter.by_op and meta["aten"] == counter.aten
    # the launchers launch nothing but their kernels at these shapes (copies / fills would be
    # launches a meta count cannot see)
    assert counter.aten_in_custom == 0
    assert meta["launches"] == meta["aten"] + meta["triton"]


def _sdpa_as_one(by_op):
    out = {}
    for op, n in by_op.items():
        key = "sdpa" if "scaled_dot_product" in op else op
        out[key] = out.get(key, 0) + n
    return out


@pytest.mark.parametrize("name", sorted(SMALL))
def test_plain_count_matches_real_cpu_forward(name):
    meta = profiler.count_launches(name, fused=False, dtype=torch.float32, device_type="cpu", **SMALL[name])
    counter, launches = _real_count(name, fused=False)
    assert launches.n == 0 and meta["triton"] == 0
    # SDPA is one kernel either way: the GPU's flash / memory-efficient op on meta, the CPU's flash op here
    assert _sdpa_as_one(meta["by_op"]) == _sdpa_as_one(counter.by_op) and meta["launches"] == counter.aten
    # SDPA counts once, as the GPU's flash / memory-efficient kernel (meta alone would decompose it)
    assert sum(n for op, n in meta["by_op"].items() if "scaled_dot_product" in op) == SMALL[name]["depth"] + (
        1 if "uvit" in name else 0)


def test_triton_counter_counts_each_launch_not_autotuner_runs(no_poison):
    from uvit_fast.ops import fused_linear

    x, w, b = torch.randn(5, 16), torch.randn(8, 16), torch.randn(8)
    with profiler.TritonLaunches() as launches:
        fused_linear(x, w, b, activation="gelu", backend="triton")
        fused_linear(x, w, b, backend="triton")
    assert launches.n == 2
    assert list(launches.names) == ["_fused_linear_fwd_kernel"]
    with profiler.TritonLaunches() as none:
        fused_linear(x, w, b, backend="torch")
    assert none.n == 0


def test_rule_for_aten_ops():
    aten = torch.ops.aten
    for op in (aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int,
               aten.permute.default, aten.expand.default, aten.split.Tensor, aten.unbind.int, aten.detach.default,
               aten.empty.memory_format, aten.promote_types.default, aten.slice.Tensor, aten.as_strided.default):
        assert profiler.aten_launches_nothing(op), op
    for op in (aten.clone.default, aten.add_.Tensor, aten.copy_.default, aten.addmm.default, aten.cat.default,
               aten._to_copy.default, aten.fill_.Scalar, aten.native_layer_norm.default):
        assert not profiler.aten_launches_nothing(op), op


def test_fused_path_launches_fewer_kernels_at_full_size():
    for name in ("DiT-XL/2", "imagenet256_uvit_huge"):
        row = profiler.launch_fields(name)
        assert 0 < row["launches_fused_triton"] < row["launches_fused"] < row["launches_plain"]
        assert "launches_unknown_ops" not in row
    # DiT-XL/2: per block one Triton kernel for each of adaLN, qkv, attention, proj + residual LN,
    # fc1, fc2 (6 x 28), and the final adaLN, patch embedding, the gated residual linears (2 x 28)
    dit = profiler.count_launches("DiT-XL/2", fused=True)
    assert dit["by_op"]["uvit_fast::attention_qkvpacked_fwd"] == 28
    assert dit["by_op"]["uvit_fast::fused_mlp_fc1"] == dit["by_op"]["uvit_fast::fused_mlp_fc2"] == 28


def test_count_launches_bad_arguments():
    with pytest.raises(TypeError, match="fused must be True or False"):
        profiler.count_launches("DiT-S/8", fused="yes")
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        profiler.count_launches("DiT-S/8", fused=True, batch=0)
    with pytest.raises(ValueError, match="device_type must be 'cuda' or 'cpu'"):
        profiler.count_launches("DiT-S/8", fused=True, device_type="mps")
    with pytest.raises(ValueError, match="unknown model|not a known|Unknown"):
        profiler.count_launches("nope", fused=True)


@pytest.mark.parametrize("name", ["DiT-XL/2", "imagenet256_uvit_huge", "clip_vit_b16"])
def test_flop_pass_counts_the_plain_launches(name):
    # count_flops counts the plain path's launches in its own pass (bf16, SDPA as on a GPU)
    assert profiler.count_flops(name)["launches_plain"] == profiler.count_launches(name, fused=False)["launches"]


@pytest.mark.parametrize("op_name", ["adaln_layer_norm", "residual_adaln_layer_norm", "fused_linear_gelu", "fused_mlp",
                                     "attention", "skip_concat_linear", "patchify_embed", "decoder_unpatchify"])
def test_each_fused_op_meta_count_matches_its_real_launches(op_name, no_poison):
    from uvit_fast.bench.host import op_cases

    op, _, args, kwargs, _ = op_cases("cpu", torch.float32)[op_name]

    def to_meta(v):
        return v.to("meta") if isinstance(v, torch.Tensor) else v

    meta_args = [to_meta(a) for a in args]
    meta_kwargs = {k: to_meta(v) for k, v in kwargs.items()}
    meta = profiler.LaunchCounter()
    with torch.no_grad(), meta:
        op(*meta_args, **meta_kwargs, backend="triton")
    real = profiler.LaunchCounter(inner=True)
    with profiler.TritonLaunches() as launches, torch.no_grad(), real:
        op(*args, **kwargs, backend="triton")
    assert meta.unknown == {} and meta.triton >= 1
    assert meta.triton == real.triton == launches.n, (meta.by_op, launches.names)
    assert meta.by_op == real.by_op and real.aten_in_custom == 0


def test_label_range_check_counts_as_each_device_runs_it():
    # uvit_fast.models.common.check_index_range: on a GPU (t >= 0) & (t < n), .all(), _assert_async;
    # on a CPU a min and a max read back. DiT-S/8 has one integer input (its labels)
    gpu = profiler.count_launches("DiT-S/8", fused=True)
    cpu = profiler.count_launches("DiT-S/8", fused=True, device_type="cpu")
    assert gpu["launches"] - cpu["launches"] == 5 - 2
    assert {op: gpu["by_op"][op] for op in ("aten.ge", "aten.lt", "aten.bitwise_and", "aten.all",
                                              "aten._assert_async")} == dict.fromkeys(
        ("aten.ge", "aten.lt", "aten.bitwise_and", "aten.all", "aten._assert_async"), 1)
    assert "aten.min" not in gpu["by_op"] and cpu["by_op"]["aten.min"] == cpu["by_op"]["aten.max"] == 1
