"""e4m3 rounding and row scales shared by the kernels that write FP8 (the quantize kernel in
:mod:`kernels.fp8_linear`, the LayerNorm's FP8 output in :mod:`kernels.adaln_layer_norm`).

A row's scale is the smallest power of two with ``amax / scale <= 448``; the values are
``e4m3(v / scale)``, rounded to nearest even. The rounding is done in fp32 bits before the
conversion, which is then exact: the interpreter's float32-to-e4m3 conversion drops the carry into
the exponent (31.08 became 16), and the explicit rounding gives PyTorch's bits everywhere.
This module never imports ``uvit_fast``.
"""
import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
EPS = 1e-12  # the smallest amax a scale is computed from (a row of zeros gets scale 2**-48)
FP8_DTYPE = torch.float8_e4m3fn


@triton.jit
def round_e4m3(v):
    """fp32 ``v`` (``|v| <= 448``) rounded to the nearest e4m3 value, ties to even, still in fp32.

    Normal e4m3 values keep 3 mantissa bits: add half an ulp (minus one, plus the kept lsb: ties to
    even) to the fp32 bits and clear the 20 dropped bits; a carry moves into the exponent as it
    should. Below 2**-6 the e4m3 step is 2**-9 (subnormals): ``20 + (-6 - e)`` bits are dropped for
    exponents ``e`` down to -9; below that the value rounds to 0 or to 2**-9 (above 2**-10)."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    drop = 20 + tl.minimum(tl.maximum(-6 - e, 0), 3)
    lsb = tl.where(drop == 23, 1, (bits >> drop) & 1)  # at 2**-9 the kept bit is the implicit one
    r = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    tiny = tl.where((bits & 0x7FFFFFFF) > 0x3A800000, 0x3B000000, 0)  # above 2**-10: 2**-9, else 0
    r = tl.where(e < -9, (bits & -2147483648) | tiny, r)  # (with v's sign)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def row_scale(amax):
    """``(scale, inverse)`` of rows with absolute maxima ``amax`` (fp32, at least EPS): ``scale`` is
    the smallest power of two with ``amax / scale <= 448``, built from amax's exponent and mantissa
    bits (``amax = m * 2**E``, ``m`` in [1, 2): ``2**(E - 8)`` when ``m <= 1.75``, else ``2**(E - 7)``),
    so that both are exact and ``x * inverse`` only shifts exponents."""
    bits = tl.maximum(amax, 1e-12).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 135 + tl.where((bits & 0x7FFFFF) > 0x600000, 1, 0)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return scale, inverse


@triton.jit
def quantize_tile(x, inverse):
    """e4m3 of the fp32 tile ``x`` times the per-row ``inverse`` scales, saturated at +-448."""
    v = tl.minimum(tl.maximum(x * inverse[:, None], -448.0), 448.0)
    return round_e4m3(v).to(tl.float8e4nv)


@triton.jit
def quantize_row(y, mask):
    """``(e4m3 values, scale)`` of one fp32 row ``y`` (1-D; ``mask``: its valid columns)."""
    amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
    scale, inverse = row_scale(amax)
    v = tl.minimum(tl.maximum(y * inverse, -448.0), 448.0)
    return round_e4m3(v).to(tl.float8e4nv), scale
