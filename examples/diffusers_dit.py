"""Sample a diffusers ``DiTPipeline`` with and without ``uvit_fast.optimize``.

Tiny random components (a 2-block DiT with head_dim 72, a small VAE, DDIM), nothing is
downloaded. The same pipeline is sampled three times from the same starting noise: as diffusers
builds it in ``--dtype``, after ``uvit_fast.optimize(pipe.transformer)`` in ``--dtype``, and as
diffusers in float64 (the reference). The optimized images must be within 2x diffusers' own
error in that dtype (plus a small floor); the script prints the numbers and exits 1 otherwise.

    python examples/diffusers_dit.py --steps 4                      # CPU: kernels under the Triton interpreter
    python examples/diffusers_dit.py --steps 25 --dtype fp16        # GPU
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="DDIM steps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="triton",
                   help="uvit_fast backend; 'triton' on CPU runs the kernels under TRITON_INTERPRET=1")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_pipeline(seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=1,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=4,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler())


@contextlib.contextmanager
def same_noise_in_every_dtype():
    """DiTPipeline draws its starting noise in the transformer's dtype, and float32 / float64
    draws differ; draw it in float32 and cast, so that every run starts from the same latents."""
    from diffusers.pipelines.dit import pipeline_dit

    draw = pipeline_dit.randn_tensor

    def float32_draw(shape, generator=None, device=None, dtype=None, **kw):
        return draw(shape, generator=generator, device=device, dtype=torch.float32, **kw).to(dtype)

    pipeline_dit.randn_tensor = float32_draw
    try:
        yield
    finally:
        pipeline_dit.randn_tensor = draw


def sample(pipe, args, labels):
    with same_noise_in_every_dtype():
        return pipe(class_labels=labels, guidance_scale=args.cfg, num_inference_steps=args.steps,
                    generator=torch.Generator().manual_seed(args.seed), output_type="pt").images


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend == "triton" and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import diffusers

    import uvit_fast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    if dtype == torch.bfloat16 and device.type == "cpu" and args.backend == "triton":
        print("bf16 on the Triton interpreter is not supported (its bf16 dots are wrong); use a GPU", file=sys.stderr)
        return 2
    base = build_pipeline(args.seed)
    labels = [1, 7]

    ref64 = copy.deepcopy(base).to(device, torch.float64)
    images64 = sample(ref64, args, labels)

    pipe = base.to(device, dtype)
    images_diffusers = sample(pipe, args, labels)

    _, report = uvit_fast.optimize(pipe.transformer)
    print(report)
    with uvit_fast.use_backend(args.backend):
        images_fused = sample(pipe, args, labels)

    diff = (images_fused.double() - images_diffusers.double()).abs().max().item()
    err_fused = (images_fused.double() - images64).abs().max().item()
    err_diffusers = (images_diffusers.double() - images64).abs().max().item()
    ok = err_fused <= 2 * err_diffusers + FLOOR[dtype]
    print(f"diffusers {diffusers.__version__}, {device.type}, {args.dtype}, backend {args.backend}, "
          f"{args.steps} DDIM steps, images {tuple(images_fused.shape)}")
    print(f"max |difference| optimized vs diffusers: {diff:.3e}")
    print(f"max error vs float64: optimized {err_fused:.3e}, diffusers {err_diffusers:.3e} -> "
          f"{'within' if ok else 'NOT within'} 2x diffusers' error + {FLOOR[dtype]:.0e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
