"""Op benchmarks at the flagship shapes only (step 2 of scripts/gpu_check.sh; needs a CUDA device).

Takes the cases of ``uvit-fast bench`` (``uvit_fast.bench.<op>.cases``) and keeps those at the
U-ViT-H/2 / DiT-XL/2 width (D 1152) and, for attention, head_dim 72 and 64 at 258 and 77 tokens;
``torch.compile`` rows are left out (their compile time would eat the budget). Each kept case is
timed with ``uvit_fast.bench.core.time_fn`` (``triton.testing.do_bench`` on CUDA), most
informative first (attention, then the GEMM ops, then the row-wise ones), until ``--budget``
seconds are spent. Writes one JSON object per row to ``--out`` and prints a table.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

OPS = ("attention", "fused_linear", "skip_concat_linear", "patch_embed", "adaln_layer_norm")


def flagship(op: str, case) -> bool:
    if case.provider == "compile":
        return False
    if op == "attention":
        return case.extra.get("head_dim") in (64, 72) and case.extra.get("L") in (77, 258)
    return "1152" in case.shape


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="FILE.jsonl")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--budget", type=float, default=150.0, help="seconds before the remaining rows are skipped")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench_flagship: no CUDA device", file=sys.stderr)
        return 2
    from uvit_fast.bench.core import time_fn

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    start = time.perf_counter()
    n_rows = n_skipped = 0
    with open(args.out, "w") as out:
        for op in OPS:
            module = importlib.import_module(f"uvit_fast.bench.{op}")
            for case in module.cases(device, dtype):
                if not flagship(op, case) or case.skip_reason:
                    continue
                row = {"op": case.op, "shape": case.shape, "pass": case.pass_, "provider": case.provider,
                       "dtype": args.dtype, "device": torch.cuda.get_device_name()}
                if time.perf_counter() - start > args.budget:
                    n_skipped += 1
                    continue
                try:
                    case.fn()  # allocate and warm up (compiles Triton kernels, autotunes)
                    torch.cuda.synchronize()
                    row.update(time_fn(case.fn, device))
                    if case.flops:
                        row["tflops"] = case.flops / row["ms"] / 1e9
                    if case.bytes:
                        row["gbps"] = case.bytes / row["ms"] / 1e6
                except Exception as exc:  # noqa: BLE001 - a provider that rejects a shape is a row
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                finally:
                    torch.cuda.empty_cache()
                out.write(json.dumps(row) + "\n")
                out.flush()
                n_rows += 1
                ms = f"{row['ms']:9.4f} ms" if "ms" in row else row.get("error", "")
                extra = f"  {row['tflops']:7.1f} TFLOP/s" if "tflops" in row else (
                    f"  {row['gbps']:7.1f} GB/s" if "gbps" in row else "")
                print(f"{op:<20} {case.shape:<48} {case.pass_:<8} {case.provider:<16} {ms}{extra}", flush=True)
    print(f"{n_rows} rows timed, {n_skipped} left out by the {args.budget:.0f} s budget", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
