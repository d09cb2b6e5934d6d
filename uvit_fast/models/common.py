"""Input checks shared by the models: clear errors naming the argument and the shapes."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def check_image(model: str, x: torch.Tensor, in_chans: int, img_size: Union[int, Tuple[int, int]], patch: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{model}: x must have shape (B, C, H, W); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{model}: x must have a floating dtype; got {x.dtype}")
    B, C, H, W = x.shape
    if C != in_chans:
        raise ValueError(f"{model}: x has {C} channels but the model was built with in_chans={in_chans} (x {tuple(x.shape)})")
    if H % patch or W % patch:
        raise ValueError(f"{model}: image size {H}x{W} is not divisible by the patch size {patch} (x {tuple(x.shape)})")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if (H, W) != size:
        raise ValueError(
            f"{model}: x is {H}x{W} but the model was built for {size[0]}x{size[1]} "
            f"(its position embedding has a fixed token count); x {tuple(x.shape)}"
        )


def check_timesteps(model: str, t, batch: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` timesteps; a Python number or a 0-d / 1-element tensor is broadcast to the batch."""
    if not isinstance(t, torch.Tensor):
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            t = torch.tensor(float(t), device=device)
        else:
            raise TypeError(f"{model}: timesteps must be a tensor of shape (B,) or a number; got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{model}: timesteps are on {t.device} but x is on {device}; put them on one device")
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1 and batch != 1):
        t = t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{model}: timesteps must have shape ({batch},) for a batch of {batch}; got {tuple(t.shape)}")
    return t


def check_labels(
    model: str, y: Optional[torch.Tensor], batch: int, num_classes: int, device: Optional[torch.device] = None
) -> None:
    """Integer labels ``(B,)`` (int64 or int32, as ``nn.Embedding`` takes) in ``[0, num_classes)``,
    on ``device`` (x's) when given; the range as :func:`check_index_range` checks it."""
    if y is None:
        raise ValueError(f"{model}: this model is class-conditional (num_classes={num_classes}); y is required")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{model}: y must be an integer tensor of shape ({batch},); got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{model}: y must have an integer dtype (int64 or int32); got {y.dtype}")
    if device is not None and y.device != device:
        raise ValueError(f"{model}: y is on {y.device} but x is on {device}; put them on one device")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{model}: y must have shape ({batch},); got {tuple(y.shape)}")
    check_index_range(model, "labels", y, num_classes)


def check_index_range(model: str, what: str, t: torch.Tensor, n: int, note: str = "") -> None:
    """Indices ``t`` (labels, token ids) lie in ``[0, n)``. On CPU tensors a ValueError gives the range
    found. On a GPU reading them back would synchronise the host with the device at every forward
    (the host could no longer queue the next step's kernels ahead, and a CUDA graph capture would
    fail), so the check runs on the device instead (``torch._assert_async``): a bad index stops the
    stream with this message, without a sync. Skipped while torch.compile traces and on meta tensors."""
    if torch.compiler.is_compiling() or t.numel() == 0 or t.device.type == "meta":
        return
    if t.device.type != "cpu":
        torch._assert_async(((t >= 0) & (t < n)).all(), f"{model}: {what} must lie in [0, {n}){note}")
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"{model}: {what} must lie in [0, {n}){note}; got values in [{lo}, {hi}]")


def check_input_dtype(model: str, name: str, t: torch.Tensor, weight: torch.Tensor) -> None:
    """A floating input that goes straight into a layer must have the layer's dtype, unless
    ``torch.autocast`` is on for its device and casts both (it never casts float64): the same rule on the fused
    and the plain path, with a message naming the argument instead of torch's ``mat1 and mat2``."""
    if not t.is_floating_point():
        raise TypeError(f"{model}: {name} must have a floating dtype; got {t.dtype}")
    # autocast casts float32/16 inputs and weights to its dtype, but never float64 ones
    cast = _autocast_on(t.device.type) and torch.float64 not in (t.dtype, weight.dtype)
    if t.dtype != weight.dtype and not cast:
        raise TypeError(
            f"{model}: {name} has dtype {t.dtype} but the model's weights are {weight.dtype}; cast it "
            f"({name}.to({weight.dtype})) or run under torch.autocast"
        )


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): never on
        return False
