"""GPU parity of every fused op at the flagship model shapes, in bf16, fp16 and fp32 (step 1 of
scripts/gpu_check.sh; needs a CUDA device).

Shapes: U-ViT-H/2 (D 1152, 16 heads, head_dim 72, 258 tokens), DiT-XL/2 (256 tokens, adaLN),
U-ViT-M/4 (head_dim 64), CLIP ViT-L/14 text (77 tokens, causal) and image patch embedding
(K 588), ViViT-B tubelets (2x16x16), at batch 2. Each op runs with ``backend=BACKEND`` and is
compared, output and every gradient, with ``uvit_fast.testing.assert_parity``: error against a
float64 reference at most 2x plain PyTorch's error in the same dtype. One line per case; exit 1
when any case fails. Usage: python scripts/gpu_parity_flagship.py [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

from uvit_fast import ops
from uvit_fast.testing import assert_parity

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"
BACKEND = "triton"  # the ops' backend under test (a CPU dry run of this script's wiring sets "torch")


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


def _check(name, fn, ref_fn, inputs, dtype):
    """fn/ref_fn take the input tensors; every input's gradient is compared too."""
    xs = [_leaf(t, dtype) if t is not None else None for t in inputs]
    base_xs = [_leaf(t, dtype) if t is not None else None for t in inputs]
    ref_xs = [_leaf(t, torch.float64) if t is not None else None for t in inputs]
    outs = fn(*xs)
    base = ref_fn(*base_xs)
    ref = ref_fn(*ref_xs)
    outs, base, ref = [o if isinstance(o, (tuple, list)) else (o,) for o in (outs, base, ref)]
    grads = [torch.randn_like(r) for r in ref]
    for i, (o, b, r) in enumerate(zip(outs, base, ref)):
        assert_parity(o, b, r, name=f"{name} output {i}")
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    torch.autograd.backward(base, [g.to(b.dtype) for g, b in zip(grads, base)])
    torch.autograd.backward(ref, grads)
    for i, (x, b, r) in enumerate(zip(xs, base_xs, ref_xs)):
        if x is not None:
            assert_parity(x.grad, b.grad, r.grad, name=f"{name} grad of input {i}")


def cases():
    r = torch.randn
    dev = DEVICE
    out = []
    for shape, D, H, L, E, causal in (("uvit-h2", 1152, 16, 258, 2, False), ("dit-xl2", 1152, 16, 256, 0, False),
                                      ("uvit-m4", 768, 12, 258, 2, False), ("clip-l14-text", 768, 12, 77, 0, True)):
        B = 2
        qkv = r(B, L, 3, H, D // H, device=dev)
        out.append((f"{shape}/attention", lambda t, c=causal: ops.attention_qkvpacked(t, causal=c, backend=BACKEND),
                    lambda t, c=causal: ops.attention_reference(*t.unbind(2), causal=c), [qkv]))
        x, br = r(B, L, D, device=dev), r(B, L, D, device=dev)
        if shape == "dit-xl2":
            mod = r(B, 3, D, device=dev)
            out.append((f"{shape}/adaln", lambda x, s, c: ops.adaln_layer_norm(x, s, c, eps=1e-6, backend=BACKEND),
                        lambda x, s, c: ops.adaln_layer_norm_reference(x, s, c, eps=1e-6), [x, mod[:, 0], mod[:, 1]]))
            out.append((f"{shape}/adaln_residual",
                        lambda x, b, g, s, c: ops.residual_adaln_layer_norm(x, b, g[:, None], s, c, eps=1e-6,
                                                                             backend=BACKEND),
                        lambda x, b, g, s, c: ops.residual_adaln_layer_norm_reference(x, b, g[:, None], s, c, eps=1e-6),
                        [x, br, mod[:, 2], mod[:, 0], mod[:, 1]]))
        else:
            w, b = r(D, device=dev), r(D, device=dev)
            out.append((f"{shape}/layernorm", lambda x, w, b: ops.adaln_layer_norm(x, None, None, w, b, backend=BACKEND),
                        lambda x, w, b: ops.adaln_layer_norm_reference(x, None, None, w, b), [x, w, b]))
            out.append((f"{shape}/residual_layernorm",
                        lambda x, br, w, b: ops.residual_adaln_layer_norm(x, br, None, None, None, w, b, backend=BACKEND),
                        lambda x, br, w, b: ops.residual_adaln_layer_norm_reference(x, br, None, None, None, w, b),
                        [x, br, w, b]))
        if shape in ("uvit-h2", "dit-xl2"):  # the linears (issue 16): qkv bare, the MLP with its (gated) residual
            act = "gelu_tanh" if shape == "dit-xl2" else "gelu"
            wq, bq = r(3 * D, D, device=dev) / D ** 0.5, r(3 * D, device=dev)
            w1, b1 = r(4 * D, D, device=dev) / D ** 0.5, r(4 * D, device=dev)
            w2m, b2m = r(D, 4 * D, device=dev) / (4 * D) ** 0.5, r(D, device=dev)
            gate = r(B, D, device=dev) if shape == "dit-xl2" else None
            out.append((f"{shape}/fused_linear_qkv", lambda x, w, b: ops.fused_linear(x, w, b, backend=BACKEND),
                        lambda x, w, b: ops.fused_linear_reference(x, w, b), [x, wq, bq]))
            out.append((f"{shape}/fused_mlp",
                        lambda x, w1, b1, w2, b2, res, g, a=act: ops.fused_mlp(x, w1, b1, w2, b2, activation=a, residual=res,
                                                                              gate=g, backend=BACKEND),
                        lambda x, w1, b1, w2, b2, res, g, a=act: ops.fused_mlp_reference(x, w1, b1, w2, b2, activation=a,
                                                                                        residual=res, gate=g),
                        [x, w1, b1, w2m, b2m, br, gate]))
        if shape.startswith("uvit"):
            skip, w2, b2 = r(B, L, D, device=dev), r(D, 2 * D, device=dev) / (2 * D) ** 0.5, r(D, device=dev)
            out.append((f"{shape}/skip_linear", lambda h, s, w, b: ops.skip_concat_linear(h, s, w, b, backend=BACKEND),
                        ops.skip_concat_linear_reference, [x, skip, w2, b2]))
    for shape, img, patch, D, E, prefix in (("uvit-h2", (4, 32, 32), (2, 2), 1152, 2, False),
                                            ("dit-xl2", (4, 32, 32), (2, 2), 1152, 0, False),
                                            ("uvit-m4", (3, 64, 64), (4, 4), 768, 2, False),
                                            ("clip-l14-vision", (3, 224, 224), (14, 14), 1024, 0, True),
                                            ("vivit-b", (3, 8, 224, 224), (2, 16, 16), 768, 0, True)):
        B = 2
        x = r(B, *img, device=dev)
        w = r(D, img[0], *patch, device=dev) / (img[0] * patch[0] * patch[1]) ** 0.5
        bias = None if prefix else r(D, device=dev)
        n = 1
        for s, p in zip(img[1:], patch):
            n *= s // p
        pre = r(1, 1, D, device=dev) if prefix else None
        pos = r(1, n + (1 if prefix else 0), D, device=dev)
        out.append((f"{shape}/patchify_embed",
                    lambda x, w, b, pre, pos: ops.patchify_embed(x, w, b, prefix=pre, pos_embed=pos, backend=BACKEND),
                    lambda x, w, b, pre, pos: ops.patchify_embed_reference(x, w, b, prefix=pre, pos_embed=pos),
                    [x, w, bias, pre, pos]))
        if not prefix:
            C = 8 if shape == "dit-xl2" else img[0]
            tok = r(B, n + E, D, device=dev)
            wd = r(C * patch[0] * patch[1], D, device=dev) / D ** 0.5
            bd = r(C * patch[0] * patch[1], device=dev)
            grid = tuple(s // p for s, p in zip(img[1:], patch))
            out.append((f"{shape}/decoder_unpatchify",
                        lambda t, w, b, p=patch, g=grid, e=E: ops.decoder_unpatchify(t, w, b, patch_size=p, grid=g,
                                                                                    extras=e, backend=BACKEND),
                        lambda t, w, b, p=patch, g=grid, e=E: ops.decoder_unpatchify_reference(t, w, b, patch_size=p,
                                                                                              grid=g, extras=e),
                        [tok, wd, bd]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write one JSON object per case to FILE")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="only these dtypes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_parity_flagship: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    results = []
    for dname in args.dtype or list(DTYPES):
        for name, fn, ref_fn, inputs in cases():
            t0 = time.perf_counter()
            try:
                _check(f"{name}/{dname}", fn, ref_fn, inputs, DTYPES[dname])
                status, detail = "ok", ""
            except Exception as exc:  # noqa: BLE001 - every case reports
                status, detail = "FAIL", f"{type(exc).__name__}: {exc}"
                traceback.print_exc(file=sys.stderr)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            row = {"case": f"{name}/{dname}", "status": status, "seconds": round(time.perf_counter() - t0, 2),
                   "detail": detail}
            results.append(row)
            print(f"{row['status']:<5} {row['case']:<40} {row['seconds']:>6.2f} s  {detail}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for row in results:
                f.write(json.dumps(row) + "\n")
    failed = [r for r in results if r["status"] != "ok"]
    print(f"{len(results) - len(failed)} of {len(results)} cases pass", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
