"""The functional API: one function per fused op, each with a ``backend`` argument.

Every function has a ``*_reference`` twin with the same signature (minus ``backend``):
the plain PyTorch specification that tests, benchmarks and the CPU path use.
"""
from uvit_fast.ops.adaln import (
    adaln_layer_norm,
    adaln_layer_norm_reference,
    residual_adaln_layer_norm,
    residual_adaln_layer_norm_reference,
)
from uvit_fast.ops.attention import attention, attention_qkvpacked, attention_reference
from uvit_fast.ops.fused_linear import (
    fused_linear,
    fused_linear_reference,
    fused_mlp,
    fused_mlp_reference,
)
from uvit_fast.ops.patch_embed import (
    decoder_unpatchify,
    decoder_unpatchify_reference,
    patchify,
    patchify_embed,
    patchify_embed_reference,
    unpatchify,
)
from uvit_fast.ops.fp8 import (
    FP8Activation,
    dequantize_fp8,
    fp8_linear,
    fp8_linear_reference,
    quantize_fp8,
    quantize_fp8_concat,
    quantize_fp8_reference,
    quantize_fp8_weight,
)
from uvit_fast.ops.skip_linear import skip_concat_linear, skip_concat_linear_reference

__all__ = [
    "adaln_layer_norm",
    "adaln_layer_norm_reference",
    "residual_adaln_layer_norm",
    "residual_adaln_layer_norm_reference",
    "attention",
    "attention_qkvpacked",
    "attention_reference",
    "patchify",
    "unpatchify",
    "patchify_embed",
    "patchify_embed_reference",
    "decoder_unpatchify",
    "decoder_unpatchify_reference",
    "skip_concat_linear",
    "skip_concat_linear_reference",
    "fused_linear",
    "fused_linear_reference",
    "fused_mlp",
    "fused_mlp_reference",
    "fp8_linear",
    "fp8_linear_reference",
    "quantize_fp8",
    "quantize_fp8_concat",
    "quantize_fp8_reference",
    "quantize_fp8_weight",
    "dequantize_fp8",
    "FP8Activation",
]
