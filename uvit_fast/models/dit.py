"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with upstream's
constructor and state_dict (facebookresearch/DiT ``models.py``)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from uvit_fast.layers import (
    Attention, LayerNorm, Mlp, PatchEmbed, attention_fp8_input, decode_tokens, mlp_residual, residual_into, script_twin,
    script_unpatchify, timestep_embedding,
)
from uvit_fast.models.common import check_image, check_labels, check_timesteps


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos table ``(grid_size**2, embed_dim)``, float64.

    The first half of the channels encodes the column index, the second half the row index
    (upstream builds its grid with ``meshgrid(w, h)``); each half is ``[sin, cos]`` of the
    position times ``10000 ** (-k / (embed_dim / 4))``.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: embed_dim {embed_dim} must be divisible by 4")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")

    def half(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1)


class TimestepEmbedder(nn.Module):
    """256-dim sinusoid -> ``mlp = Linear(256, D), SiLU, Linear(D, D)``."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout for classifier-free guidance (row ``num_classes`` is null)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x += gate * f(LN(x) * (1 + scale) + shift)`` for attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, fused: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, fused=fused)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, fused=fused)
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, fused=fused)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs upstream's block (:class:`ScriptDiTBlock`)."""
        return script_twin(self, ScriptDiTBlock)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.fused and attention_fp8_input(self.attn):  # uvit_fast.quantize: the norm writes qkv's FP8 input
            attn_out = self.attn(self.norm1.quantized(x, shift_msa, scale_msa))
        else:
            attn_out = self.attn(self.norm1.modulated(x, shift_msa, scale_msa))
        if self.fused:
            x, h = residual_into(self.norm2, self.mlp, x, attn_out, gate_msa, shift_mlp, scale_mlp)
            return mlp_residual(self.mlp, x, h, gate_mlp)  # x + gate_mlp * mlp(h): one fused_mlp call
        x = x + gate_msa.unsqueeze(1) * attn_out
        h = self.norm2.modulated(x, shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, fused: bool = True):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6, fused=fused)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def __prepare_scriptable__(self) -> nn.Module:
        return script_twin(self, ScriptFinalLayer)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Modulated norm only; the model applies ``linear`` fused with the unpatchify."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.norm_final.modulated(x, shift, scale)


class DiT(nn.Module):
    """Diffusion Transformer. ``forward(x, t, y)`` -> ``(B, out_channels, H, W)`` with
    ``out_channels = 2 * in_channels`` when ``learn_sigma``."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        fused: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"DiT: input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"DiT: hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.fused = fused
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, fused=fused)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, fused=fused) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, fused=fused)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream's init: xavier-uniform linears, fixed sin-cos pos_embed, the patch conv initialised like
        a Linear (xavier-uniform weight, zero bias), zeroed adaLN and output layers."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.input_size // self.patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs upstream's math (:class:`ScriptDiT`, the same parameters):
        ``torch.jit.script(model)`` gives the PyTorch reference, not the kernels."""
        return script_dit_twin(self)

    def example_inputs(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        """Random ``(x, t, y)`` of the right shapes, for profiling and benchmarks."""
        device = device or self.pos_embed.device
        x = torch.randn(batch_size, self.in_channels, self.input_size, self.input_size, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (batch_size,), device=device).float()
        return x, t, torch.randint(0, self.y_embedder.num_classes, (batch_size,), device=device)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        check_image("DiT", x, self.in_channels, self.input_size, self.patch_size)
        B = x.shape[0]
        t = check_timesteps("DiT", t, B, x.device)
        check_labels("DiT", y, B, self.y_embedder.embedding_table.num_embeddings, x.device)
        x = self.x_embedder.embed(x, pos_embed=self.pos_embed)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return decode_tokens(self.final_layer.linear, x, patch_size=self.patch_size, extras=0, fused=self.fused)

    def forward_with_cfg(
        self, x: torch.Tensor, t, y: torch.Tensor, cfg_scale: float, guidance_channels: Optional[int] = 3
    ) -> torch.Tensor:
        """Classifier-free guidance in one batch, as upstream: the first half of ``x`` is run with
        the first half of ``y`` (conditional) and with the second half (usually the null class
        ``num_classes``), and ``uncond + cfg_scale * (cond - uncond)`` is applied to the first
        ``guidance_channels`` output channels and returned for both halves; the other channels
        are each half's own output. The default, 3, is upstream's (which guides only three
        channels "for exact reproducibility" of the paper's samples); ``guidance_channels=None``
        guides all ``in_channels``, the standard choice."""
        if x.shape[0] % 2:
            raise ValueError(f"DiT.forward_with_cfg: the batch must be even (cond + uncond halves); got x {tuple(x.shape)}")
        n = self.in_channels if guidance_channels is None else guidance_channels
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= self.out_channels:
            raise ValueError(
                f"DiT.forward_with_cfg: guidance_channels must be an int in [1, {self.out_channels}] "
                f"(out_channels) or None; got {guidance_channels!r}"
            )
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :n], out[:, n:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


# --------------------------------------------------------------------------- TorchScript twins
def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ScriptDiTBlock(nn.Module):
    """TorchScript twin of :class:`DiTBlock`: upstream's adaLN-Zero block."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class ScriptFinalLayer(nn.Module):
    """TorchScript twin of :class:`FinalLayer`: the modulated norm (the model twin applies ``linear``)."""

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return _modulate(self.norm_final(x), shift, scale)


class ScriptDiT(nn.Module):
    """TorchScript twin of :class:`DiT` (and of an ``optimize``'d upstream DiT): upstream's forward."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1 and x.shape[0] != 1):
            t = t.reshape(1).expand(x.shape[0])
        x = self.x_embedder.embed(x, None, self.pos_embed)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer.linear(self.final_layer(x, c))
        return script_unpatchify(x, self.patch_size, self.grid, self.grid)


def script_dit_twin(model: nn.Module) -> nn.Module:
    """The TorchScript twin of a DiT (ours, or upstream's after ``optimize``): same parameters. The
    timestep and label embedders become this package's classes (upstream's attribute names and math)."""
    twin = script_twin(model, ScriptDiT)
    twin.t_embedder = script_twin(model.t_embedder, TimestepEmbedder)
    twin.t_embedder.frequency_embedding_size = int(model.t_embedder.mlp[0].in_features)
    twin.y_embedder = script_twin(model.y_embedder, LabelEmbedder)
    twin.patch_size = int(model.patch_size)
    twin.grid = int(model.input_size) // int(model.patch_size)
    return twin
