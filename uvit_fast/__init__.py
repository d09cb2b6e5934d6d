"""uvit-fast: fused Triton kernels and drop-in models for ViT-style diffusion backbones.

The public names below are imported on first use (PEP 562 module ``__getattr__``), so that
``import uvit_fast`` alone, and with it ``uvit-fast --help``, does not pay torch's and
triton's import time. ``uvit_fast.create_model``, ``from uvit_fast import optimize`` and
``uvit_fast.ops`` work as with eager imports.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any, Dict, Tuple

__version__ = "0.1.0"

# public name -> (module, attribute in it; None = the module itself)
_EXPORTS: Dict[str, Tuple[str, Any]] = {
    "ops": ("uvit_fast.ops", None),
    "fused_linear": ("uvit_fast.ops", "fused_linear"),
    "fused_mlp": ("uvit_fast.ops", "fused_mlp"),
    "use_backend": ("uvit_fast._backend", "use_backend"),
    "get_backend": ("uvit_fast._backend", "get_backend"),
    "BackendError": ("uvit_fast._backend", "BackendError"),
    "refresh_settings": ("uvit_fast._backend", "refresh_settings"),
    "create_model": ("uvit_fast.models", "create_model"),
    "list_models": ("uvit_fast.models", "list_models"),
    "load_upstream_checkpoint": ("uvit_fast.models", "load_upstream_checkpoint"),
    "text_to_image_context": ("uvit_fast.models", "text_to_image_context"),
    "optimize": ("uvit_fast.optimize", "optimize"),
    "OptimizeReport": ("uvit_fast.optimize", "OptimizeReport"),
    "quantize": ("uvit_fast.quantization", "quantize"),
    "QuantizeReport": ("uvit_fast.quantization", "QuantizeReport"),
    "tune": ("uvit_fast.tuning", "tune"),
    "dispatch_report": ("uvit_fast.dispatch", "dispatch_report"),
    "cuda_graph": ("uvit_fast.cuda_graphs", "cuda_graph"),
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs only
    from uvit_fast import ops
    from uvit_fast.ops import fused_linear, fused_mlp
    from uvit_fast._backend import BackendError, get_backend, refresh_settings, use_backend
    from uvit_fast.models import create_model, list_models, load_upstream_checkpoint, text_to_image_context
    from uvit_fast.optimize import OptimizeReport, optimize
    from uvit_fast.dispatch import dispatch_report
    from uvit_fast.tuning import tune
    from uvit_fast.cuda_graphs import cuda_graph


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        # a submodule (uvit_fast.models, uvit_fast.layers, ...): imported on first access, as
        # the eager imports used to make them attributes
        if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'uvit_fast' has no attribute {name!r}")
    module = importlib.import_module(target[0])
    value = module if target[1] is None else getattr(module, target[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Keeps the exported function ``uvit_fast.optimize`` from being replaced by the submodule
    of the same name: Python's import system binds a submodule to its package as an attribute
    the first time it is imported (with eager imports this happened before ``__init__`` bound
    the function, so the function won)."""

    def __setattr__(self, name: str, value: Any) -> None:
        target = _EXPORTS.get(name)
        if (
            target is not None
            and target[1] is not None
            and isinstance(value, types.ModuleType)
            and value.__name__ == target[0]
        ):
            value = getattr(value, target[1])
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
