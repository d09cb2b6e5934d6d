"""FP8 benchmarks for the first GPU run (a step of scripts/gpu_check.sh; needs a CUDA device with FP8).

Rows, most informative first, until ``--budget`` seconds are spent (``triton.testing.do_bench``):

1. GEMMs at U-ViT-H/2 batch 64 (M = 64 * 258 = 16,512): qkv (K 1152, N 3456), proj + residual
   (1152 -> 1152), fc1 + GELU (1152 -> 4608), fc2 + residual (4608 -> 1152). Providers:
   ``bf16_cublas`` (``F.linear`` in bf16, the bare GEMM: the issue's baseline), ``bf16_eager`` (the
   same with the eager epilogue), ``scaled_mm`` (``torch._scaled_mm`` row-wise + the eager epilogue),
   ``uvit_fast`` (``fp8_linear(backend="triton")``, one kernel), and ``quantize`` (the activation's
   quantize kernel alone, which the fused blocks run for proj and fc2 only). Targets (issue 24):
   ``uvit_fast`` >= 1.6x ``bf16_cublas`` and >= 1.05x ``scaled_mm``.
2. Whole forwards at batch 64, bf16: the fused U-ViT-H/2 and DiT-XL/2, plain bf16 and after
   ``uvit_fast.quantize(model, "fp8")`` (target: >= 1.4x), and torchao's float8 dynamic
   quantization (row-wise) under ``torch.compile`` where torchao imports (target: ours >= 1.2x).

Writes one JSON object per row to ``--out`` (appended) and prints a table with the ratios.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

B, L, D, H = 64, 258, 1152, 4608
GEMMS = [  # name, K, N, activation, residual
    ("qkv", D, 3 * D, None, False),
    ("fc1+gelu", D, H, "gelu", False),
    ("fc2+res", H, D, None, True),
    ("proj+res", D, D, None, True),
]


def _gemm_rows(budget_end: float):
    from triton.testing import do_bench

    from uvit_fast.ops import fp8 as F8

    dev = torch.device("cuda")
    M = B * L
    for name, K, N, act, res in GEMMS:
        if time.perf_counter() > budget_end:
            yield {"row": name, "skipped": "budget"}
            continue
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
        b = torch.randn(N, device=dev, dtype=torch.bfloat16)
        r = torch.randn(M, N, device=dev, dtype=torch.bfloat16) if res else None
        x_q, x_s = F8.quantize_fp8(x)
        w_q, w_s = F8.quantize_fp8_weight(w)

        def eager():
            y = F.linear(x, w, b)
            y = F.gelu(y) if act else y
            return y + r if res else y

        providers = {
            "bf16_cublas": lambda: F.linear(x, w, b),
            "bf16_eager": eager,
            "quantize": lambda: F8.quantize_fp8(x, backend="triton"),
        }
        for backend in ("scaled_mm", "triton"):
            try:
                F8.fp8_linear(x_q, x_s, w_q, w_s, b, activation=act, residual=r, backend=backend)
            except Exception as exc:  # noqa: BLE001 - report and go on
                yield {"row": name, "provider": backend, "error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            providers["uvit_fast" if backend == "triton" else backend] = (
                lambda backend=backend: F8.fp8_linear(x_q, x_s, w_q, w_s, b, activation=act, residual=r,
                                                      backend=backend))
        times = {}
        for prov, fn in providers.items():
            try:
                fn()
                torch.cuda.synchronize()
                times[prov] = do_bench(fn, warmup=25, rep=100)
            except Exception as exc:  # noqa: BLE001
                yield {"row": name, "provider": prov, "error": f"{type(exc).__name__}: {exc}"[:300]}
        flops = 2 * M * K * N
        for prov, ms in times.items():
            row = {"row": f"{name} M={M} K={K} N={N}", "provider": prov, "ms": ms,
                   "tflops": flops / ms / 1e9 if prov != "quantize" else None}
            if "uvit_fast" in times and prov in ("bf16_cublas", "scaled_mm"):
                row["uvit_fast_speedup"] = ms / times["uvit_fast"]
            yield row


def _model_rows(budget_end: float):
    from triton.testing import do_bench

    import uvit_fast
    from uvit_fast.testing import randomize_

    dev = torch.device("cuda")
    for preset in ("imagenet256_uvit_huge", "DiT-XL/2"):
        if time.perf_counter() > budget_end:
            yield {"row": preset, "skipped": "budget"}
            continue
        torch.manual_seed(0)

        def build():
            m = uvit_fast.create_model(preset).eval()
            randomize_(m, std=0.02)
            return m.to(dev, torch.bfloat16)

        size = 32
        x = torch.randn(B, 4, size, size, device=dev, dtype=torch.bfloat16)
        t = torch.full((B,), 500.0, device=dev, dtype=torch.bfloat16)
        y = torch.randint(0, 1000, (B,), device=dev)
        args = (x, t, y)
        times = {}
        model = build()
        with torch.inference_mode():
            for name in ("bf16_fused", "fp8_fused"):
                if name == "fp8_fused":
                    print(uvit_fast.quantize(model, "fp8").__str__().splitlines()[0], file=sys.stderr)
                try:
                    model(*args)
                    torch.cuda.synchronize()
                    times[name] = do_bench(lambda: model(*args), warmup=5, rep=30)
                except Exception as exc:  # noqa: BLE001
                    yield {"row": preset, "provider": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            del model
            torch.cuda.empty_cache()
            try:
                from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

                ao = build()
                quantize_(ao, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
                ao = torch.compile(ao)
                ao(*args)
                torch.cuda.synchronize()
                times["torchao_fp8_compile"] = do_bench(lambda: ao(*args), warmup=5, rep=30)
                del ao
            except ImportError as exc:
                yield {"row": preset, "provider": "torchao_fp8_compile", "skipped": f"torchao: {exc}"}
            except Exception as exc:  # noqa: BLE001
                yield {"row": preset, "provider": "torchao_fp8_compile", "error": f"{type(exc).__name__}: {exc}"[:300]}
        torch.cuda.empty_cache()
        for name, ms in times.items():
            row = {"row": f"{preset} forward B={B}", "provider": name, "ms": ms}
            if "fp8_fused" in times and name != "fp8_fused":
                row["fp8_speedup"] = ms / times["fp8_fused"]
            yield row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="FILE.jsonl")
    parser.add_argument("--budget", type=float, default=80.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench_fp8: no CUDA device", file=sys.stderr)
        return 2
    if torch.cuda.get_device_capability() < (8, 9):
        print(f"gpu_bench_fp8: {torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability < 8.9)")
        return 0
    end = time.perf_counter() + args.budget
    device = torch.cuda.get_device_name()
    with open(args.out, "a") as out:
        print(f"{'row':<44} {'provider':<22} {'ms':>9} {'TFLOP/s':>8} {'speedup':>8}")
        for rows in (_gemm_rows(time.perf_counter() + args.budget * 0.5), _model_rows(end)):
            for row in rows:
                row.update(device=device, suite="fp8")
                out.write(json.dumps(row) + "\n")
                out.flush()
                if "ms" in row:
                    tf = f"{row['tflops']:.0f}" if row.get("tflops") else ""
                    sp = row.get("uvit_fast_speedup") or row.get("fp8_speedup")
                    print(f"{row['row']:<44} {row['provider']:<22} {row['ms']:>9.3f} {tf:>8} "
                          f"{'' if sp is None else f'{sp:.2f}x':>8}")
                else:
                    print(f"{row['row']:<44} {row.get('provider', ''):<22} {row.get('error') or row.get('skipped')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
