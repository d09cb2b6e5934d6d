"""uvit-fast: fused Triton kernels and drop-in models for ViT-style diffusion backbones."""
from uvit_fast._backend import get_backend, use_backend
from uvit_fast import ops
from uvit_fast.models import create_model, list_models, load_upstream_checkpoint
from uvit_fast.optimize import OptimizeReport, optimize

__version__ = "0.1.0"

__all__ = [
    "ops",
    "use_backend",
    "get_backend",
    "create_model",
    "list_models",
    "load_upstream_checkpoint",
    "optimize",
    "OptimizeReport",
    "__version__",
]
