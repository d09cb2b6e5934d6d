"""``profile --memory`` (uvit_fast/memory.py): saved-for-backward bytes and HBM traffic of a tiny
U-ViT and a tiny DiT, fused and plain, against values worked out by hand from what each op must
keep for its backward and what each kernel reads and writes; the largest-batch and roofline
arithmetic; the JSON schema; the CLI errors.

Every expected value below is written out op by op from first principles (bf16 = 2 bytes,
fp32 = 4, int64 = 8), not taken from the code under test. Per-sample values are what the
profiler reports: the count at batch 2 minus the count at batch 1.
"""
import json

import pytest
import torch

from uvit_fast import memory
from uvit_fast.cli import main
from uvit_fast.cli_args import PROFILE_GPUS

BF16, FP32, I64 = 2, 4, 8

# ----------------------------------------------------------------------------------------------
# the tiny models: cifar10_uvit_small (unconditional, no time MLP, qkv without bias, final 3x3 conv)
# and DiT-S/2 (learn_sigma: 8 output channels), each cut to width 32, 2 heads, depth 2, 8 x 8 input

UVIT = dict(name="cifar10_uvit_small", img=8, patch=2, overrides=dict(embed_dim=32, depth=2, num_heads=2))
DIT = dict(name="DiT-S/2", img=8, patch=2, overrides=dict(hidden_size=32, depth=2, num_heads=2))


def tiny(spec, fused):
    return memory.build_meta(spec["name"], spec["img"], spec["patch"], fused, **spec["overrides"])


def per_sample(spec, fused):
    """(saved bytes, checkpointed saved bytes, forward HBM bytes) per sample, from batch 1 and 2."""
    model = tiny(spec, fused)
    c1, c2 = memory.count_step(model, 1, fused), memory.count_step(model, 2, fused)
    return (c2.saved - c1.saved, c2.saved_checkpointed - c1.saved_checkpointed,
            c2.traffic("forward") - c1.traffic("forward"))


# U-ViT: C=3 channels, 8 x 8 image, patch 2 -> N=16 patches, L=17 tokens (1 time token), D=32,
# H=2 heads, MLP hidden 128; blocks: in-block, mid-block, out-block (with the long skip)
U_C, U_S, U_N, U_L, U_D, U_H = 3, 8, 16, 17, 32, 2
U_T = U_L * U_D * BF16  # one (L, D) bf16 token tensor: 1088 bytes
U_IMG = U_C * U_S * U_S * BF16  # the image: 384 bytes
U_STATS = 2 * U_L * FP32  # a LayerNorm's mean and rstd (fp32 per token): 136 bytes

# DiT: C=4 in, 8 out channels, 8 x 8 latent, patch 2 -> L=16 tokens, D=32, H=2, MLP hidden 128,
# 256-dim frequency embedding, labels with dropout (training mode)
D_C, D_S, D_L, D_D, D_H = 4, 8, 16, 32, 2
D_T = D_L * D_D * BF16  # 1024 bytes
D_IMG = D_C * D_S * D_S * BF16  # 512 bytes
D_STATS = 2 * D_L * FP32  # 128 bytes
D_VEC = D_D * BF16  # one (D,) per-sample vector (c, SiLU(c), a timestep-MLP activation): 64 bytes


def test_saved_bytes_tiny_uvit_fused():
    T = U_T
    block = (
        T + U_STATS                          # adaln_layer_norm (norm1): x, mean, rstd
        + T                                  # qkv Linear: its input (norm1's output)
        + 3 * T + T + U_H * 2 * U_L * FP32   # attention_qkvpacked: qkv (B,L,3,H,Dh), out, stats (B,H,2,L) fp32
        + 0                                  # proj Linear: its input is attention's out, already saved
        + T + U_STATS                        # residual_adaln_layer_norm (norm2): x_new, mean, rstd (no gate: branch not kept)
        + T                                  # fc1: its input h (norm2's output)
        + 4 * T                              # GELU: its input (fc1's output, width 4D)
        + 4 * T                              # fc2: its input (GELU's output)
    )                                        # the residual add keeps nothing
    expected = (
        U_IMG                                # patchify_embed: the image
        + 3 * block                          # in-, mid-, out-block
        + T                                  # skip_concat_linear: h (mid-block output); skip = in-block output, saved
        + T + U_STATS                        # final norm: x, mean, rstd
        + T                                  # decoder_unpatchify: the normalised tokens
        + U_IMG                              # final 3x3 conv: its input image
    )
    assert expected == 51 * T + 7 * U_STATS + 3 * U_H * 2 * U_L * FP32 + 2 * U_IMG == 58024
    saved, _, _ = per_sample(UVIT, True)
    assert saved == expected


def test_saved_bytes_tiny_uvit_plain():
    T = U_T
    lse = U_H * 32 * FP32  # memory-efficient attention's logsumexp (B, H, L rounded up to 32) fp32
    block = (
        T + U_STATS                          # LayerNorm (norm1): x, mean, rstd
        + T                                  # qkv Linear: its input
        + 3 * (2 * T)                        # upstream's q.float(), k.float(), v.float(): fp32 copies, saved by SDPA
        + 2 * T + lse                        # SDPA (memory-efficient kernel, fp32): out (fp32), logsumexp
        + T                                  # proj Linear: its input (out cast back to bf16)
        + T + U_STATS                        # norm2: x + attn (a new tensor), mean, rstd
        + T                                  # fc1: norm2's output
        + 4 * T + 4 * T                      # GELU input, fc2 input
    )
    expected = (
        U_IMG                                # patch-embedding conv: the image
        + 3 * block
        + 2 * T                              # skip_linear: its input cat([h, skip]) (L, 2D)
        + T + U_STATS                        # final norm
        + T                                  # decoder_pred Linear: its input
        + U_IMG                              # final conv: its input
    )
    assert expected == 67 * T + 7 * U_STATS + 3 * lse + 2 * U_IMG == 75384
    saved, _, _ = per_sample(UVIT, False)
    assert saved == expected


def test_saved_bytes_tiny_dit_fused():
    T = D_T
    mod6 = 6 * D_D * BF16  # adaLN_modulation output (B, 6D): shift/scale/gate are views of it, counted once
    block = (
        D_VEC                                # adaLN Linear: its input SiLU(c) (SiLU's input c is shared)
        + T + mod6 + D_STATS                 # adaln_layer_norm: x, shift and scale (one storage), mean, rstd
        + T                                  # qkv Linear: its input
        + 3 * T + T + D_H * 2 * D_L * FP32   # attention_qkvpacked: qkv, out, stats
        + T + T + D_STATS                    # residual_adaln_layer_norm: x_new, branch, (gate/shift/scale: mod6), stats
        + T + 4 * T + 4 * T                  # fc1 input h, GELU input, fc2 input
        + T                                  # gate_mlp * mlp(h): the MLP output (the gate is a view of mod6)
    )
    expected = (
        D_IMG                                # patchify_embed: the latent
        + 256 * BF16                         # timestep MLP: Linear(256, D) input (the cast frequency embedding)
        + D_VEC + D_VEC                      # SiLU input, Linear(D, D) input
        + I64                                # label embedding: the (dropped-out) label indices
        + D_VEC                              # c = t + y, kept by every block's SiLU (once)
        + 2 * block
        + D_VEC + 2 * D_D * BF16             # final adaLN: SiLU(c), then its (B, 2D) output (shift, scale)
        + T + D_STATS                        # final adaln_layer_norm: x, mean, rstd
        + T                                  # decoder_unpatchify: the tokens
    )
    assert expected == 38 * T + 3464 == 42376
    saved, _, _ = per_sample(DIT, True)
    assert saved == expected


def test_saved_bytes_tiny_dit_plain():
    T = D_T
    mod6 = 6 * D_D * BF16
    lse = D_H * D_L * FP32  # flash attention's logsumexp (B, H, L) fp32
    block = (
        D_VEC                                # adaLN Linear: SiLU(c)
        + T + D_STATS                        # LayerNorm (norm1): x, mean, rstd
        + D_VEC + T                          # LN(x) * (1 + scale): the new (1 + scale) and LN(x)
        + T                                  # qkv Linear: its input (+ shift keeps nothing)
        + 3 * T                              # SDPA (flash, bf16): q, k, v, views of one qkv storage
        + T + lse                            # ... out (its storage is what proj reads, counted once), logsumexp
        + mod6 + T                           # x + gate_msa * attn: the gate (view of mod6) and proj's output
        + T + D_STATS + D_VEC + T + T        # norm2 of the new x: x, stats, (1 + scale), LN(x), fc1 input
        + 4 * T + 4 * T                      # GELU input, fc2 input
        + T                                  # gate_mlp * mlp(h): the MLP output
    )
    expected = (
        D_IMG + 256 * BF16 + D_VEC + D_VEC + I64 + D_VEC  # as in the fused path
        + 2 * block
        + D_VEC                              # final adaLN Linear: SiLU(c)
        + T + D_STATS + D_VEC + T            # final LayerNorm: x, stats, (1 + scale), LN(x)
        + T                                  # final Linear: its input
    )
    assert expected == 43 * T + 3400 == 47432
    saved, _, _ = per_sample(DIT, False)
    assert saved == expected


def test_checkpointed_saved_bytes_tiny_uvit_fused():
    """With every block checkpointed, the block inputs and everything outside the blocks stay,
    plus one block's activations while it is recomputed (the largest: the out-block)."""
    T = U_T
    outside = U_IMG + (T + U_STATS) + T + U_IMG           # patch embed, final norm, decoder, final conv
    block_inputs = T + T + T                             # in-block x0, mid-block x1 (= the skip), out-block h
    out_block = 16 * T + 2 * U_STATS + U_H * 2 * U_L * FP32  # its own saves: everything but h and skip
    _, ckpt, _ = per_sample(UVIT, True)
    assert ckpt == outside + block_inputs + out_block == 24296


# ----------------------------------------------------------------------------------------------
# HBM bytes per forward: each kernel reads each distinct input once and writes each output once;
# per sample, so weights (read once per forward whatever the batch) drop out


def _time_embedding_traffic(dim):
    """timestep_embedding(t, dim) in fp32, then cast to bf16: per sample."""
    half = dim // 2
    return (
        (FP32 + half * FP32)                 # t[:, None] * freqs: read t, write (half,) (freqs are constant)
        + 2 * (2 * half * FP32)              # cos and sin: read and write (half,)
        + (2 * half * FP32 + dim * FP32)     # cat: read both halves, write (dim,)
        + (dim * FP32 + dim * BF16)          # .to(bf16)
    )


def test_hbm_bytes_tiny_uvit_fused():
    T, D, L = U_T, U_D, U_L
    block = (
        (T + T + U_STATS)                    # adaln_layer_norm: read x, write out + mean, rstd
        + (T + 3 * T)                        # qkv mm
        + (3 * T + T + U_H * 2 * L * FP32)   # attention: read qkv, write out + stats
        + (T + T)                            # proj
        + (2 * T + 2 * T + U_STATS)          # residual LN: read x, branch; write x_new, h, stats
        + (T + 4 * T + 4 * T)                # fused_mlp_fc1: read h; write GELU(z) and z (kept for backward)
        + (4 * T + T + T)                    # fused_mlp_fc2: read GELU(z) and the residual x; write x + fc2(..)
    )
    expected = (
        _time_embedding_traffic(D)
        + (U_IMG + D * BF16 + T)             # patchify_embed: read image and time token, write tokens
        + 3 * block
        + (2 * T + T)                        # skip_concat_linear: read h and skip, write
        + (T + T + U_STATS)                  # final norm
        + (T + U_IMG)                        # decoder_unpatchify: read tokens, write the image
        + (U_IMG + U_IMG)                    # final conv
    )
    assert expected == 112940
    _, _, hbm = per_sample(UVIT, True)
    assert hbm == expected


def test_hbm_bytes_tiny_uvit_plain():
    T, D, L, N = U_T, U_D, U_L, U_N
    lse = U_H * 32 * FP32
    block = (
        (T + T + U_STATS)                    # LayerNorm
        + (T + 3 * T)                        # qkv mm
        + 3 * (T + 2 * T)                    # q, k, v .float(): read bf16, write fp32
        + (6 * T + 2 * T + lse)              # memory-efficient SDPA: read q, k, v fp32, write out fp32 + lse
        + (2 * T + T)                        # out .to(bf16)
        + (T + T)                            # proj
        + (2 * T + T)                        # residual add
        + (T + T + U_STATS)                  # norm2
        + (T + 4 * T) + (4 * T + 4 * T) + (4 * T + T)  # fc1, GELU, fc2
        + (2 * T + T)                        # residual add
    )
    patch_out = N * 2 * 2 * U_C * BF16       # decoder_pred output per patch token: p*p*C values
    expected = (
        _time_embedding_traffic(D)
        + (U_IMG + N * D * BF16)             # patch conv: read image, write N patch tokens
        + (D * BF16 + N * D * BF16 + T)      # cat([time token, patches])
        + (T + T)                            # + pos_embed
        + 3 * block
        + (2 * T + 2 * T) + (2 * T + T)      # skip: cat([h, skip]), then Linear(2D, D)
        + (T + T + U_STATS)                  # final norm
        + (T + L * 2 * 2 * U_C * BF16)       # decoder_pred on every token
        + (patch_out + patch_out)            # unpatchify's rearrange copy (extras dropped)
        + (U_IMG + U_IMG)                    # final conv
    )
    assert expected == 197332
    _, _, hbm = per_sample(UVIT, False)
    assert hbm == expected


def _dit_conditioning_traffic():
    """t-embedder MLP, label dropout + embedding, c = t + y; per sample."""
    D = D_D
    return (
        _time_embedding_traffic(256)
        + (256 * BF16 + D * BF16)            # Linear(256, D)
        + 2 * D * BF16 + (D * BF16 + D * BF16)  # SiLU, Linear(D, D)
        + FP32 + (FP32 + 1)                  # label dropout: rand (fp32), < p (bool)
        + I64 + (1 + I64 + I64 + I64)        # full_like(labels, null): writes only; where(drop, null, labels)
        + (I64 + D * BF16)                   # embedding: read the index, write one row
        + (2 * D * BF16 + D * BF16)          # c = t + y
    )


def test_hbm_bytes_tiny_dit_fused():
    T, D, L = D_T, D_D, D_L
    v = D * BF16  # one (D,) modulation vector read per sample
    block = (
        2 * v + (v + 6 * v)                  # SiLU(c); adaLN Linear(D, 6D)
        + (T + 2 * v + T + D_STATS)          # adaln_layer_norm: read x, shift, scale; write out, stats
        + (T + 3 * T)                        # qkv
        + (3 * T + T + D_H * 2 * L * FP32)   # attention
        + (T + T)                            # proj
        + (2 * T + 3 * v + 2 * T + D_STATS)  # residual LN: read x, branch, gate, shift, scale
        + (T + 4 * T + 4 * T)                # fused_mlp_fc1: read h; write GELU(z) and z (kept for backward)
        + (4 * T + T + v + T + T)            # fused_mlp_fc2: read GELU(z), x, gate_mlp; write x + gate * y
    )                                        # and y = fc2(..) (kept for the gate's gradient)
    expected = (
        (D_IMG + T)                          # patchify_embed (+ pos_embed, a weight)
        + _dit_conditioning_traffic()
        + 2 * block
        + 2 * v + (v + 2 * v)                # final SiLU(c), Linear(D, 2D)
        + (T + 2 * v + T + D_STATS)          # final adaln_layer_norm
        + (T + L * 2 * 2 * 2 * D_C * BF16)   # decoder_unpatchify: read tokens, write 8 channels
    )
    assert expected == 81974
    _, _, hbm = per_sample(DIT, True)
    assert hbm == expected


def test_hbm_bytes_tiny_dit_plain():
    T, D, L = D_T, D_D, D_L
    v = D * BF16

    def modulated_norm():  # LayerNorm(x) * (1 + scale) + shift
        return (T + T + D_STATS) + (v + v) + (T + v + T) + (T + v + T)

    block = (
        2 * v + (v + 6 * v)                  # SiLU(c); adaLN Linear
        + modulated_norm()
        + (T + 3 * T)                        # qkv
        + (3 * T + T + D_H * L * FP32)       # flash SDPA: read q, k, v; write out + logsumexp
        + (T + T)                            # proj
        + (T + v + T) + (2 * T + T)          # gate_msa * attn, residual add
        + modulated_norm()
        + (T + 4 * T) + (4 * T + 4 * T) + (4 * T + T)  # MLP
        + (T + v + T) + (2 * T + T)          # gate_mlp * mlp, residual add
    )
    out = L * 2 * 2 * 2 * D_C * BF16         # final Linear output: p*p*8 values per token
    expected = (
        (D_IMG + T) + (T + T)                # patch conv, + pos_embed
        + _dit_conditioning_traffic()
        + 2 * block
        + 2 * v + (v + 2 * v)                # final SiLU(c), Linear(D, 2D)
        + modulated_norm()
        + (T + out)                          # final Linear
        + (out + out)                        # unpatchify's rearrange copy
    )
    assert expected == 127414
    _, _, hbm = per_sample(DIT, False)
    assert hbm == expected


def test_saved_tensor_counter_counts_each_storage_once():
    """A tensor saved twice, and views of one storage, count once at the storage's full size;
    the excluded (parameter) storages not at all."""
    from torch.autograd.graph import saved_tensors_hooks

    w = torch.empty(8, 8, device="meta", requires_grad=True)  # stands for a parameter
    a = torch.empty(4, 8, device="meta", requires_grad=True)
    counter = memory.SavedTensorCounter([w])
    with saved_tensors_hooks(counter.pack, counter.unpack):
        b = a * a            # mul saves a twice: a's storage, 4 x 8 fp32 = 128 bytes, once
        b[:2].sin()          # sin saves the view b[:2]: b's whole storage, 128 bytes
        b[2:].cos()          # another view of b: nothing new
        b @ w.t()            # mm saves b (already counted) and w.t() (excluded)
    assert counter.total() == 4 * 8 * FP32 + 4 * 8 * FP32


def test_traffic_write_only_arguments_are_not_read():
    """One kernel reads each input once and writes each output once; an argument an op only
    writes (the destination of copy_ / fill_ / zero_, an out= tensor) is not read, while an
    in-place update (add_) reads and writes its self."""
    def one(fn):
        with memory.TrafficTrace() as trace:
            fn()
        (k,) = trace.kernels
        return k.read, k.written

    t = 4 * 8 * BF16  # one (4, 8) bf16 tensor: 64 bytes
    dst, src, other = (torch.empty(4, 8, device="meta", dtype=torch.bfloat16) for _ in range(3))
    assert one(lambda: dst.copy_(src)) == (t, t)
    assert one(lambda: dst.fill_(1.0)) == (0, t)
    assert one(lambda: dst.zero_()) == (0, t)
    assert one(lambda: torch.add(src, other, out=dst)) == (2 * t, t)
    assert one(lambda: dst.add_(src)) == (2 * t, t)
    assert one(lambda: torch.full_like(src, 0.1)) == (0, t)  # a *_like factory uses src's shape only


def test_backend_triton_accepted_on_meta():
    """The fused count needs backend='triton' on meta tensors (fake implementations, no launch);
    'auto' still resolves meta to the torch path, so plain FLOP counting is unchanged."""
    from uvit_fast._backend import resolve

    t = torch.empty(2, 3, device="meta")
    assert resolve("triton", "op", t) == "triton"
    assert resolve("auto", "op", t) == "torch"


def test_fused_count_runs_the_custom_ops_and_plain_does_not():
    """The fused count goes through the uvit_fast:: ops (not the torch path twice); the plain
    count has none of them and runs SDPA as a GPU kernel, not its L x L math path."""
    for spec in (UVIT, DIT):
        fused = {k.op for k in memory.count_step(tiny(spec, True), 1, True).kernels}
        plain = {k.op for k in memory.count_step(tiny(spec, False), 1, False).kernels}
        assert {"uvit_fast.attention_qkvpacked_fwd.default", "uvit_fast.attention_qkvpacked_bwd.default",
                "uvit_fast.adaln_layer_norm.default", "uvit_fast.residual_adaln_layer_norm.default",
                "uvit_fast.decoder_unpatchify.default", "uvit_fast.patchify_embed.default"} <= fused
        assert "aten.native_layer_norm.default" not in fused
        assert not any(op.startswith("uvit_fast.") for op in plain)
        assert not any("bmm" in op or "_softmax" in op for op in plain)
    uvit_fused = {k.op for k in memory.count_step(tiny(UVIT, True), 1, True).kernels}
    assert "uvit_fast.skip_concat_linear.default" in uvit_fused


def test_traced_flops_match_the_flop_counter():
    """The roofline's per-kernel FLOPs: torch's formulas plus memory.py's own for the fused GEMM
    ops. Per sample, the fused forward does the plain path's FLOPs (the profiler's count), except
    that U-ViT's fused decoder projects only the N patch tokens, not the extra time token:
    2 x 1 x D x (p p C) fewer; its backward (dtokens and dweight) saves twice that again."""
    from uvit_fast import profiler

    for spec, extra in ((UVIT, 2 * 1 * U_D * (2 * 2 * U_C)), (DIT, 0)):
        flops = {}
        for fused in (True, False):
            model = tiny(spec, fused)
            c1, c2 = memory.count_step(model, 1, fused), memory.count_step(model, 2, fused)
            flops[fused] = (c2.flops("forward") - c1.flops("forward"), c2.flops() - c1.flops())
        counted = profiler.count_flops(spec["name"], spec["img"], spec["patch"], **spec["overrides"])["flops"]
        assert flops[False][0] == counted
        assert flops[True][0] == counted - extra
        assert flops[True][1] == flops[False][1] - 3 * extra


def test_models_with_several_outputs_are_counted():
    """CLIP returns (logits_per_image, logits_per_text): the backward starts from every output."""
    model = memory.build_meta("clip_vit_b32", 64, 32, True, vision_width=64, vision_layers=1, embed_dim=32,
                              transformer_width=32, transformer_heads=2, transformer_layers=1, vocab_size=100)
    count = memory.count_step(model, 1, True)
    assert count.saved > 0 and count.flops("backward") > count.flops("forward") > 0


def test_count_does_not_change_with_calls():
    model = tiny(DIT, True)
    first = memory.count_step(model, 2, True)
    second = memory.count_step(model, 2, True)
    assert (first.saved, first.saved_checkpointed) == (second.saved, second.saved_checkpointed)
    assert [(k.op, k.read, k.written, k.flops) for k in first.kernels] == \
           [(k.op, k.read, k.written, k.flops) for k in second.kernels]
    assert all(p.grad is None for p in model.parameters())  # the model is left as it was found


# ----------------------------------------------------------------------------------------------
# arithmetic: largest batch, state bytes, roofline


def test_max_batch_arithmetic():
    gib = 2**30
    # 80 GiB; 10 GiB of weights/grads/AdamW; 300 MiB per sample -> floor(70 GiB / 300 MiB) = 238
    assert memory.max_batch(80 * gib, 10 * gib, 300 * 2**20) == 238
    assert memory.max_batch(100, 40, 20) == 3  # 40 + 3 * 20 = 100 fits exactly
    assert memory.max_batch(100, 41, 20) == 2
    assert memory.max_batch(100, 200, 20) == 0  # the state alone does not fit
    with pytest.raises(ValueError, match="per_sample must be positive"):
        memory.max_batch(100, 0, 0)


def test_memory_fields_tiny_uvit():
    model = tiny(UVIT, True)
    params = sum(p.numel() for p in model.parameters())
    budget = 50 * 2**20
    row = memory.memory_fields(UVIT["name"], UVIT["img"], UVIT["patch"], gpu="a100", gpu_memory=budget,
                               **UVIT["overrides"])
    assert row["saved_bytes_fused"] == 58024 and row["saved_bytes_plain"] == 75384
    assert row["hbm_bytes_fused"] == 112940 and row["hbm_bytes_plain"] == 197332
    # AMP training state: fp32 weights (4) + fp32 grads (4) + AdamW m, v (8) + bf16 weight copy (2)
    assert row["state_bytes"] == 18 * params
    assert (row["param_bytes"], row["grad_bytes"], row["adamw_bytes"]) == (4 * params, 4 * params, 8 * params)
    # fused: no batch-independent saved tensors; plain: SDPA's two int64 RNG scalars per block
    assert row["saved_bytes_fixed_fused"] == 0 and row["saved_bytes_fixed_plain"] == 3 * 2 * I64
    assert row["max_batch_fused"] == (budget - 18 * params) // 58024
    assert row["max_batch_plain"] == (budget - 18 * params - 48) // 75384
    assert row["max_batch_checkpointed_fused"] == (budget - 18 * params) // 24296
    assert row["max_batch_checkpointed_fused"] > row["max_batch_fused"] > row["max_batch_plain"] > 0
    # forward weight reads are the batch-independent traffic: every parameter once in bf16 ...
    assert row["hbm_bytes_fixed_fused"] >= 2 * params
    # ... and the intensity is forward FLOPs over the per-sample bytes
    assert row["intensity_fused"] > row["intensity_plain"] > 0


def test_roofline_per_kernel():
    gpu = memory.GPUS["h100"]
    kernels = [
        memory.Kernel("aten.mm.default", "gemm", "forward", read=10**6, written=10**6, flops=10**12),  # compute-bound
        memory.Kernel("aten.mm.default", "gemm", "forward", read=10**9, written=0, flops=10**9),  # bandwidth-bound
        memory.Kernel("x.attention_fwd", "attention", "forward", read=0, written=0, flops=989 * 10**9),
        memory.Kernel("aten.gelu.default", "memory", "forward", read=335 * 10**7, written=0, flops=0),
    ]
    rf = memory.roofline(kernels, gpu)
    assert rf["gemm"] == pytest.approx(1e12 / 989e12 + 1e9 / 3.35e12)
    assert rf["attention"] == pytest.approx(1e-3)
    assert rf["memory"] == pytest.approx(1e-3)


def test_gpu_table_is_the_datasheets():
    assert sorted(memory.GPUS) == sorted(PROFILE_GPUS)
    assert (memory.GPUS["h100"].bf16_flops, memory.GPUS["h100"].hbm_bandwidth) == (989e12, 3.35e12)
    assert (memory.GPUS["h200"].bf16_flops, memory.GPUS["h200"].hbm_bandwidth) == (989e12, 4.8e12)
    assert (memory.GPUS["a100"].bf16_flops, memory.GPUS["a100"].hbm_bandwidth) == (312e12, 2.039e12)
    assert memory.GPUS["h100"].memory == 80 * 2**30


def test_parse_memory_and_gpu_errors():
    assert memory.parse_memory("80GiB") == 80 * 2**30
    assert memory.parse_memory("80 GB") == 80 * 10**9
    assert memory.parse_memory("40960MiB") == 40 * 2**30
    for bad in ("80", "lots", "-1GB", "0GiB", "80 GiBs"):
        with pytest.raises(ValueError, match="--gpu-memory must be"):
            memory.parse_memory(bad)
    with pytest.raises(ValueError, match="--gpu must be one of a100, h100, h200; got 'v100'"):
        memory.get_gpu("v100")


# ----------------------------------------------------------------------------------------------
# CLI

MEMORY_KEYS = {
    "saved_bytes_fused": int, "saved_bytes_plain": int, "hbm_bytes_fused": int, "hbm_bytes_plain": int,
    "saved_bytes_checkpointed_fused": int, "saved_bytes_checkpointed_plain": int,
    "hbm_bytes_step_fused": int, "hbm_bytes_step_plain": int, "hbm_bytes_fixed_fused": int,
    "intensity_fused": float, "intensity_plain": float, "max_batch_fused": int, "max_batch_plain": int,
    "max_batch_checkpointed_fused": int, "max_batch_checkpointed_plain": int,
    "roofline_fwd_ms_fused": dict, "roofline_fwd_ms_plain": dict, "roofline_step_ms_fused": dict,
    "state_bytes": int, "gpu": str, "gpu_memory_bytes": int, "roofline_batch": int, "memory_model": str,
}


@pytest.mark.slow
def test_cli_memory_json_schema(capsys):
    assert main(["profile", "--model", "DiT-S/8", "--memory", "--gpu", "A100", "--gpu-memory", "40GiB",
                 "--json", "--no-progress"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    row = json.loads(line)
    for key, kind in MEMORY_KEYS.items():
        assert isinstance(row[key], kind), (key, row.get(key))
    assert row["gpu"] == "a100" and row["gpu_memory_bytes"] == 40 * 2**30
    assert "model" in row["memory_model"] and "not a measurement" in row["memory_model"]
    for key in ("roofline_fwd_ms_fused", "roofline_step_ms_plain"):
        assert set(row[key]) == {"gemm", "attention", "memory"} and all(v > 0 for v in row[key].values())
    assert row["saved_bytes_plain"] > row["saved_bytes_fused"] > row["saved_bytes_checkpointed_fused"] > 0
    assert row["hbm_bytes_step_fused"] > row["hbm_bytes_fused"]


def test_memory_row_schema_and_table():
    from uvit_fast import profiler

    row = memory.memory_fields(DIT["name"], DIT["img"], DIT["patch"], **DIT["overrides"])
    for key, kind in MEMORY_KEYS.items():
        assert isinstance(row[key], kind), (key, row.get(key))
    json.dumps(row)  # what --json prints
    row.update(model="DiT-S/2 (tiny)", patch_size=2, tokens=16)
    table = profiler.format_memory_table([row])
    assert "MODELLED" in table and "not measured" in table and "datasheet" in table
    assert "saved fused" in table and "HBM plain" in table and "max B ckpt fused" in table  # which path
    assert f"{row['saved_bytes_fused'] / 2**20:.1f}" in table
    # how a GPU measurement is shown beside the model (the fields measure_training returns on CUDA)
    row.update(measured_batch=8, measured_path="fused", measured_peak_bytes=3 * 2**30, measured_step_ms=12.5,
               measured_device="NVIDIA H100 80GB HBM3", modelled_peak_bytes_fused=profiler.modelled_peak_bytes(row, 8, "fused"))
    line = profiler.format_memory_table([row]).splitlines()[-1]
    assert "MEASURED on NVIDIA H100 80GB HBM3" in line and "peak 3.00 GiB" in line and "12.5 ms" in line
    assert f"the model says {row['modelled_peak_bytes_fused'] / 2**30:.2f} GiB" in line


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--gpu", "v100"], "invalid choice: 'v100'"),
        (["--gpu-memory", "80"], "--gpu-memory must be a size with a unit"),
        (["--gpu-memory", "lots"], "--gpu-memory must be a size with a unit"),
    ],
)
def test_cli_memory_errors(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--memory", *argv])
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [(["--gpu", "a100"], "--gpu applies only to --memory; add --memory"),
                                        (["--gpu-memory", "40GB"], "--gpu-memory applies only to --memory")])
def test_cli_gpu_options_need_memory(argv, match, capsys):
    assert main(["profile", "--model", "DiT-S/8", "--no-progress", *argv]) == 2
    captured = capsys.readouterr()
    assert match in captured.err and captured.out == ""


def test_modelled_peak_bytes():
    from uvit_fast import profiler

    row = {"state_bytes": 1000, "saved_bytes_fixed_plain": 48, "saved_bytes_plain": 300,
           "saved_bytes_fixed_fused": 0, "saved_bytes_fused": 200}
    assert profiler.modelled_peak_bytes(row, 4, "plain") == 1000 + 48 + 4 * 300
    assert profiler.modelled_peak_bytes(row, 4, "fused") == 1000 + 4 * 200


def test_measured_training_skipped_without_cuda():
    from uvit_fast import profiler

    row = {"model": "DiT-S/8", "img_size": 32, "patch_size": 8}
    out = profiler.measure_training(row, 2, torch.device("cpu"))
    assert set(out) == {"measured_skipped"} and "no CUDA device" in out["measured_skipped"]


def test_measured_training_step_takes_every_output():
    """The step --memory --batch times on CUDA, run here on a CPU (autocast 'cpu'): CLIP returns
    (logits_per_image, logits_per_text), and the step's loss covers both (it called .float() on
    the tuple: AttributeError); a single-output model (DiT) steps as before."""
    from uvit_fast import profiler

    clip, _, _ = profiler.build_model("clip_vit_b32", 64, 32, vision_width=64, vision_layers=1, embed_dim=32,
                                      transformer_width=32, transformer_heads=2, transformer_layers=1, vocab_size=100)
    dit, _, _ = profiler.build_model("DiT-S/2", 8, 2, hidden_size=32, depth=1, num_heads=2)
    for model in (clip, dit):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        profiler.training_step(model, opt, model.example_inputs(2, device="cpu"), "cpu")()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing  # the loss reached every weight (CLIP: both towers)
        assert len(opt.state) == sum(p.requires_grad for p in model.parameters())  # and AdamW stepped them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures torch.cuda.max_memory_allocated: needs a CUDA GPU")
def test_measured_training_on_cuda():
    from uvit_fast import profiler

    row = {"model": "DiT-S/8", "img_size": 32, "patch_size": 8}
    out = profiler.measure_training(row, 4, torch.device("cuda"))
    model = memory.build_meta("DiT-S/8", None, None, True)
    params = sum(p.numel() for p in model.parameters())
    assert out["measured_peak_bytes"] > 16 * params  # weights, grads and AdamW state at least
    assert out["measured_step_ms"] > 0


@pytest.mark.slow
def test_readme_and_docs_quote_the_counted_rows():
    """The acceptance rows: U-ViT-H/2 and DiT-XL/2 at 256 px, as README.md and docs/profiling.md
    quote them (MiB per sample, one decimal), are what the profiler counts today."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    docs = (root / "docs" / "profiling.md").read_text()
    for name, label in (("imagenet256_uvit_huge", "U-ViT-H/2 (`imagenet256_uvit_huge`)"), ("DiT-XL/2", "DiT-XL/2")):
        row = memory.memory_fields(name)
        mib = {k: f"{row[k] / 2**20:.1f}" for k in ("saved_bytes_fused", "saved_bytes_plain", "hbm_bytes_fused",
                                                      "hbm_bytes_plain")}
        line = (f"| {label} | {mib['saved_bytes_fused']} / {mib['saved_bytes_plain']} MiB | "
                f"{mib['hbm_bytes_fused']} / {mib['hbm_bytes_plain']} MiB |")
        assert line in readme, line
        for key in mib:
            assert f"{mib[key]} MiB" in docs, (name, key)
