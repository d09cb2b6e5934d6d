r"""Sample with DDIM and classifier-free guidance from a fused U-ViT or DiT preset.

Without --checkpoint the weights are random, so the samples are noise (the run shows that
every fused op works end to end, not what the model draws); give an upstream checkpoint file
for real samples. Only the diffusion presets (U-ViT, U-ViT-T2I, DiT) sample; `uvit-fast
models` lists them. CPU works (use a small --depth to be quick):

    python examples/sample_ddim.py --model DiT-S/8 --depth 2 --steps 5 --batch 2
    python examples/sample_ddim.py --model imagenet256_uvit_huge --checkpoint imagenet256_uvit_huge.pth \
        --steps 50 --cfg 4 --batch 8 --dtype bf16     # on a GPU
"""
import argparse
import sys
import time

import torch

import uvit_fast
from uvit_fast.cli_args import positive_int
from uvit_fast.models import is_diffusion_model, suggest_models
from uvit_fast.sampling import ddim_sample, linear_betas, null_label, sd_betas


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", default="DiT-S/8", metavar="NAME",
                    help="a diffusion preset: a U-ViT, U-ViT-T2I or DiT name from `uvit-fast models` (default: DiT-S/8)")
    ap.add_argument("--checkpoint", default=None, metavar="FILE.pth",
                    help="an upstream checkpoint for the preset (default: none, random weights: the samples are noise)")
    ap.add_argument("--depth", type=positive_int, default=None, metavar="N",
                    help="override the number of blocks, for a quick run with random weights (default: the preset's)")
    ap.add_argument("--steps", type=positive_int, default=10, help="DDIM steps (default: 10)")
    ap.add_argument("--cfg", type=float, default=4.0,
                    help="classifier-free guidance scale; 1 turns guidance off (default: 4.0)")
    ap.add_argument("--batch", type=positive_int, default=2, help="samples to draw (default: 2)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="torch.autocast dtype; fp32 runs without autocast (default: fp32)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the noise and the labels (default: 0)")
    ap.add_argument("--out", default=None, metavar="FILE.pt",
                    help="save the samples (latents for the latent models) with torch.save (default: not saved)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        diffusion = is_diffusion_model(args.model)
    except ValueError as exc:
        ap.error(str(exc).split(" uvit_fast.list_models()")[0] + " `uvit-fast models` lists every name")
    if not diffusion:
        hint = [n for n in suggest_models(args.model) if is_diffusion_model(n)]
        ap.error(
            f"--model {args.model} is not a diffusion model (it has no timestep input, so DDIM cannot sample "
            f"from it); choose a U-ViT, U-ViT-T2I or DiT preset, e.g. DiT-S/8"
            + (f" or {', '.join(hint)}" if hint else "") + " (`uvit-fast models uvit` / `uvit-fast models dit`)"
        )
    if args.checkpoint is None:
        print("random weights (no --checkpoint): the samples are noise; pass an upstream checkpoint for images",
              file=sys.stderr)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {"depth": args.depth} if args.depth else {}
    model = uvit_fast.create_model(args.model, **overrides)
    if args.checkpoint:
        try:
            uvit_fast.load_upstream_checkpoint(model, args.checkpoint)
        except (OSError, ValueError) as exc:  # no such file, or not this preset's checkpoint
            ap.error(f"--checkpoint {args.checkpoint}: {exc}")
    model = model.to(device).eval()
    torch.manual_seed(args.seed)
    x_in = model.example_inputs(args.batch, device=device)
    noise = torch.randn_like(x_in[0])
    cond = null = None
    if len(x_in) == 3 and x_in[2].dtype == torch.long:  # class-conditional
        cond = x_in[2]
        try:
            null = torch.full_like(cond, null_label(model))
        except ValueError as exc:  # e.g. the 1000-class ImageNet-64 U-ViTs: trained without guidance
            print(f"sampling without classifier-free guidance: {exc}")
    elif len(x_in) == 3:  # text-to-image: random "CLIP" context, zeros as the empty prompt
        cond, null = x_in[2], torch.zeros_like(x_in[2])
    # the latent U-ViTs (4 channels) were trained with latent diffusion's scaled-linear schedule;
    # the pixel U-ViTs and DiT with the linear one
    latent_uvit = hasattr(model, "in_blocks") and getattr(model, "in_chans", None) == 4
    betas = sd_betas() if latent_uvit else linear_betas()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=args.dtype != "fp32"):
        out = ddim_sample(model, noise, steps=args.steps, cond=cond, null_cond=null,
                          cfg_scale=args.cfg if null is not None else 1.0, betas=betas, progress=True)
    dt = time.perf_counter() - t0
    print(f"{args.model} on {device}: {args.batch} samples x {args.steps} steps in {dt:.2f} s; "
          f"output {tuple(out.shape)} mean {out.float().mean():.3f} std {out.float().std():.3f}")
    if args.out:
        torch.save(out.cpu(), args.out)
    return out


if __name__ == "__main__":
    main()
