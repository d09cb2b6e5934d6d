"""Host time: what a call of a fused op, or a whole forward, costs on the CPU side.

At tiny compute the time of a call is its Python, dispatch and launch overhead: the number that
decides whether the fused path pays off at the small batches of diffusion sampling. Two tables:

* **per op call** (:func:`measure_ops`): every fused op at a tiny shape, called three ways: its
  ``*_reference`` twin directly, ``backend="torch"`` and ``backend="auto"`` with the op's
  measured-dispatch key decided by a first (untimed) call; the median of ``calls`` calls each.
  Ratios: ``torch / reference`` and ``auto / the candidate auto chose`` (plus the difference in
  microseconds). The ways of one op are timed in rounds (:func:`time_interleaved`), so that the
  load of a shared machine weighs on them alike.
* **per forward** (:func:`measure_forwards`): a preset with its depth kept (U-ViT-H/2: 29 blocks,
  DiT-XL/2: 28) and its width shrunk (64, 2 heads, a 4x4 latent), batch 1, plain
  (``fused=False``) against fused (``fused=True``, ``auto`` decided by a first call), timed in
  rounds like the ops; the ratio fused / plain.

It runs in a process of its own (``python -m uvit_fast.bench.host``; :func:`run_subprocess`)
with the environment set before anything is imported: ``UVIT_FAST_TUNE=1`` (measured dispatch on,
also on CPU), ``UVIT_FAST_TUNE_CACHE`` on a temporary file (the user's cache is untouched), one
thread (``torch.set_num_threads(1)``), and on a CPU ``TRITON_INTERPRET=1``: there the first call
times the interpreted Triton kernel against PyTorch, the interpreter loses, ``auto`` runs PyTorch,
and what is timed is the wrapper and dispatch overhead around it. On CUDA the decision is real and
the host time is the wall time of a call without synchronizing (the queue is drained at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

#: the fused ops timed per call, in the order of the table
OPS: Tuple[str, ...] = ("adaln_layer_norm", "residual_adaln_layer_norm", "fused_linear_gelu", "fused_mlp", "attention",
                        "skip_concat_linear", "patchify_embed", "decoder_unpatchify")
#: the presets of the per-forward rows (their depth is kept)
FORWARD_MODELS: Tuple[str, ...] = ("imagenet256_uvit_huge", "DiT-XL/2")
#: what every CPU host row says it is
CPU_LABEL = "CPU, 1 thread"


def _percentiles(times_us: Sequence[float]) -> Dict[str, float]:
    q = statistics.quantiles(times_us, n=10) if len(times_us) > 1 else [times_us[0]] * 9
    return {"us": statistics.median(times_us), "us_p20": q[1], "us_p80": q[7], "us_min": min(times_us)}


def time_calls(fn: Callable[[], Any], calls: int, sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median / p20 / p80 microseconds of ``calls`` timed calls of ``fn`` (each timed alone with
    ``time.perf_counter_ns``), after ``max(3, calls // 20)`` untimed ones."""
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        raise ValueError(f"time_calls: calls must be a positive integer; got {calls!r}")
    return time_interleaved({"fn": fn}, calls, sync)["fn"]


def time_interleaved(fns: Dict[str, Callable[[], Any]], calls: int,
                     sync: Callable[[], None] = lambda: None) -> Dict[str, Dict[str, float]]:
    """:func:`time_calls` of several functions in rounds (one call of each per round, each timed
    alone), so that a shared machine's load changes weigh on all of them alike and their ratios
    hold; name -> median / p20 / p80 / min microseconds. The order is shuffled every round (seeded):
    a call right after a heavier one runs with its caches and allocator state disturbed (an SDPA call
    after the math attention measured 12-19 us slower than the same call after itself), and a fixed
    (or rotated) order put that cost on whichever way followed the heavy one."""
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        raise ValueError(f"time_interleaved: calls must be a positive integer; got {calls!r}")
    for _ in range(max(3, calls // 20)):
        for fn in fns.values():
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    for _ in range(calls):
        shuffle(order)
        for name, fn in order:
            t0 = clock()
            fn()
            times[name].append((clock() - t0) / 1e3)
    sync()
    return {name: _percentiles(t) for name, t in times.items()}


def op_cases(device: Any, dtype: Any) -> Dict[str, Tuple[Callable[..., Any], Callable[..., Any], tuple, dict, str]]:
    """op -> (fused op, reference, args, kwargs, shape label) at tiny shapes: batch 1, 6 tokens (2
    of them extras), width 64, 2 heads of 32."""
    import torch

    from uvit_fast import ops

    B, L, D, H = 1, 6, 64, 2
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    x, branch = r(B, L, D), r(B, L, D)
    shift, scale, gate = r(B, D), r(B, D), r(B, D)
    w, b = r(D), r(D)
    tok = f"B={B} L={L} D={D}"
    img = r(B, 4, 4, 4)  # a 4x4 latent with 4 channels, patch 2: 4 patches
    return {
        "adaln_layer_norm": (ops.adaln_layer_norm, ops.adaln_layer_norm_reference,
                             (x, shift, scale, None, None, 1e-6, 1.0), {}, tok + " (DiT modulation)"),
        "residual_adaln_layer_norm": (ops.residual_adaln_layer_norm, ops.residual_adaln_layer_norm_reference,
                                      (x, branch, gate, shift, scale, None, None, 1e-6, 1.0), {},
                                      tok + " (DiT gate and modulation)"),
        "fused_linear_gelu": (ops.fused_linear, ops.fused_linear_reference, (x, r(4 * D, D), r(4 * D)),
                              {"activation": "gelu"}, f"{tok} -> {4 * D}, gelu"),
        "fused_mlp": (ops.fused_mlp, ops.fused_mlp_reference, (x, r(4 * D, D), r(4 * D), r(D, 4 * D), r(D)),
                      {"residual": branch}, f"{tok}, hidden {4 * D}, + residual"),
        "attention": (ops.attention, ops.attention_reference,
                      (r(B, L, H, D // H), r(B, L, H, D // H), r(B, L, H, D // H)), {}, f"B={B} L={L} H={H} Dh={D // H}"),
        "skip_concat_linear": (ops.skip_concat_linear, ops.skip_concat_linear_reference,
                               (x, branch, r(D, 2 * D), r(D)), {}, f"{tok}, [h | skip] -> {D}"),
        "patchify_embed": (ops.patchify_embed, ops.patchify_embed_reference, (img, r(D, 4, 2, 2), r(D)),
                           {"prefix": r(B, 2, D), "pos_embed": r(1, 6, D)}, f"4x4x4 latent, p=2, 2 extras, D={D}"),
        "decoder_unpatchify": (ops.decoder_unpatchify, ops.decoder_unpatchify_reference, (x, r(16, D), r(16)),
                               {"patch_size": 2, "grid": (2, 2), "extras": 2}, f"{tok} -> 4x4x4, p=2, 2 extras"),
    }


def _decisions() -> Dict[str, str]:
    """key -> chosen candidate, from the measured-dispatch table (getattr-guarded: its API moves)."""
    try:
        from uvit_fast import dispatch

        return {row["key"]: row["choice"] for row in dispatch.snapshot()}
    except Exception:  # noqa: BLE001
        return {}


def measure_ops(device: Any, dtype: Any, calls: int, ops_: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """One row per (op, way): ``reference``, ``torch``, ``auto`` (and the chosen candidate's
    ``backend=`` when it is not ``torch``), in microseconds."""
    import torch

    cases = op_cases(device, dtype)
    unknown = [o for o in ops_ or () if o not in cases]
    if unknown:
        raise ValueError(f"host: unknown op {', '.join(unknown)}; choose from: {', '.join(cases)}")
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    rows: List[Dict[str, Any]] = []
    for name in ops_ or OPS:
        op, ref, args, kwargs, shape = cases[name]
        before = _decisions()
        with torch.no_grad():
            op(*args, **kwargs)  # decides the key (times the candidates where tuning is on)
            sync()
            new = {k: v for k, v in _decisions().items() if before.get(k) != v}
            chosen = sorted(set(new.values()))
            fns = {"reference": lambda: ref(*args, **kwargs), "torch": lambda: op(*args, **kwargs, backend="torch"),
                   "auto": lambda: op(*args, **kwargs)}
            for c in chosen:
                if c != "torch" and _accepts_backend(op, c, args, kwargs):
                    fns[c] = lambda c=c: op(*args, **kwargs, backend=c)
            timed = time_interleaved(fns, calls, sync)
            t_ref, t_torch, t_auto = timed.pop("reference"), timed.pop("torch"), timed.pop("auto")
            extra_ways = timed
        base = {"op": name, "shape": shape, "calls": calls}
        rows.append({**base, "way": "reference", **t_ref})
        rows.append({**base, "way": "torch", **t_torch, "ratio": t_torch["us"] / t_ref["us"],
                     "ratio_desc": "backend='torch' / reference (target <= 1.25)"})
        if len(chosen) == 1 and (chosen[0] == "torch" or chosen[0] in extra_ways):
            pick = t_torch if chosen[0] == "torch" else extra_ways[chosen[0]]
            auto = {"ratio": t_auto["us"] / pick["us"], "extra_us": t_auto["us"] - pick["us"],
                    "ratio_desc": f"auto / backend='{chosen[0]}', the chosen candidate (target: <= 5 us more)"}
        elif len(chosen) == 1 and chosen[0] != "triton":
            # a PyTorch candidate with no backend= of its own (fused_linear's 'addmm_activation'):
            # backend='torch' is the PyTorch path it is one formulation of
            auto = {"ratio": t_auto["us"] / t_torch["us"], "extra_us": t_auto["us"] - t_torch["us"],
                    "ratio_desc": (f"auto / backend='torch' (auto chose '{chosen[0]}', a PyTorch candidate that has "
                                   "no backend= of its own; target: <= 5 us more)")}
        else:
            auto = {"auto_note": (f"no single decision recorded for this call ({chosen or 'none'}): "
                                  "auto is not compared with a candidate")}
        rows.append({**base, "way": "auto", **t_auto, "chosen": chosen[0] if len(chosen) == 1 else None,
                     "decisions": new, **auto})
        for c, t in extra_ways.items():
            rows.append({**base, "way": c, **t})
    return rows


def _accepts_backend(op: Callable[..., Any], name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``op(..., backend=name)`` is a valid call (attention's ``"sdpa"``: yes; a candidate
    name that is no backend: no)."""
    try:
        op(*args, **kwargs, backend=name)
    except (ValueError, TypeError):
        return False
    return True


def forward_model(name: str, fused: bool, *, depth: Optional[int] = None, width: int = 64, heads: int = 2,
                  device: Any = "cpu", dtype: Any = None):
    """The preset ``name`` at tiny compute: its depth (or ``depth``), ``width`` and ``heads``, a 4x4
    latent, patch 2 (4 patches; U-ViT adds its time and label tokens)."""
    import torch

    from uvit_fast.models import create_model, model_config

    cfg = model_config(name)
    dit = "hidden_size" in cfg
    kw: Dict[str, Any] = {"num_heads": heads, "patch_size": 2, ("hidden_size" if dit else "embed_dim"): width,
                          ("input_size" if dit else "img_size"): 4}
    if depth is not None:
        kw["depth"] = depth
    with torch.device(device):
        model = create_model(name, fused=fused, **kw).eval()
    if dtype is not None:
        model = model.to(dtype)
    return model


def measure_forwards(device: Any, dtype: Any, calls: int, models: Sequence[str] = FORWARD_MODELS, *,
                     depth: Optional[int] = None, width: int = 64, heads: int = 2) -> List[Dict[str, Any]]:
    """Per model: ``plain`` and ``fused`` forward of batch 1, in microseconds, in one process."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    rows: List[Dict[str, Any]] = []
    for name in models:
        fns, first = {}, {}
        for path in ("plain", "fused"):
            model = forward_model(name, path == "fused", depth=depth, width=width, heads=heads, device=device,
                                  dtype=dtype)
            inputs = model.example_inputs(1, device=device, dtype=dtype)
            with torch.no_grad():
                t0 = time.perf_counter()
                model(*inputs)  # decides every measured-dispatch key (fused)
                sync()
                first[path] = time.perf_counter() - t0
            fns[path] = lambda model=model, inputs=inputs: model(*inputs)
            blocks = depth if depth is not None else _depth(model)
        with torch.no_grad():
            times = time_interleaved(fns, calls, sync)
        for path in times:
            times[path]["first_call_s"] = first[path]
        shape = f"depth={blocks} width={width} heads={heads} 4x4 latent p=2 B=1"
        rows.append({"op": name, "shape": shape, "way": "plain", "calls": calls, **times["plain"]})
        rows.append({"op": name, "shape": shape, "way": "fused", "calls": calls, **times["fused"],
                     "ratio": times["fused"]["us"] / times["plain"]["us"], "ratio_desc": "fused / plain"})
    return rows


def _depth(model) -> int:
    for attr in ("in_blocks", "blocks"):
        blocks = getattr(model, attr, None)
        if blocks is not None:
            n = len(blocks)
            if attr == "in_blocks":  # U-ViT: in + mid + out
                n += 1 + len(getattr(model, "out_blocks", []))
            return n
    return -1


def environment_label(device: Any) -> str:
    import torch

    return CPU_LABEL if torch.device(device).type == "cpu" else torch.cuda.get_device_name(device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uvit_fast.bench.host", description=__doc__.split("\n")[0])
    p.add_argument("--op-calls", type=int, default=2000)
    p.add_argument("--forward-calls", type=int, default=200)
    p.add_argument("--models", default=",".join(FORWARD_MODELS))
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: Dict[str, Any] = {"device": environment_label(device), "dtype": str(dtype).replace("torch.", ""),
                           "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
                           "cpu_count": os.cpu_count(), "env": {k: os.environ.get(k) for k in (
                               "UVIT_FAST_TUNE", "TRITON_INTERPRET", "UVIT_FAST_BACKEND")}}
    ops_ = [o for o in args.ops.split(",") if o]
    models = [m for m in args.models.split(",") if m]
    out["ops"] = measure_ops(device, dtype, args.op_calls, ops_) if ops_ else []
    out["forwards"] = measure_forwards(device, dtype, args.forward_calls, models, depth=args.depth,
                                       width=args.width) if models else []
    out["load_average_end"] = list(os.getloadavg())
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


def run_subprocess(*, op_calls: int, forward_calls: int, models: Sequence[str] = FORWARD_MODELS,
                   ops_: Sequence[str] = OPS, depth: Optional[int] = None, width: int = 64,
                   timeout: float = 600.0, cuda: bool = False) -> Dict[str, Any]:
    """Run :func:`main` in a fresh interpreter with the environment of the module docstring;
    returns its JSON. A failure is a RuntimeError with the child's last output."""
    with tempfile.TemporaryDirectory(prefix="uvit-fast-host-") as tmp:
        env = dict(os.environ)
        env.update(UVIT_FAST_TUNE="1", UVIT_FAST_TUNE_CACHE=os.path.join(tmp, "tune.json"), UVIT_FAST_POISON="0",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("UVIT_FAST_BACKEND", None)
        if cuda:
            env.pop("TRITON_INTERPRET", None)
        else:
            env["TRITON_INTERPRET"] = "1"
        out = os.path.join(tmp, "host.json")
        cmd = [sys.executable, "-m", "uvit_fast.bench.host", "--op-calls", str(op_calls), "--forward-calls",
               str(forward_calls), "--models", ",".join(models), "--ops", ",".join(ops_), "--width", str(width),
               "--out", out] + (["--depth", str(depth)] if depth is not None else [])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"host measurement took longer than {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"host measurement failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
        with open(out) as f:
            return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
