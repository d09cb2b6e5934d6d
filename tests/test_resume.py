"""Resuming upstream training on ours: upstream's U-ViT loop saves ``optimizer.pth`` (DiT's saves
``opt``), and ``optimizer.load_state_dict`` matches the per-parameter state by position, so our
models must register their parameters in upstream's order. Each test trains one AdamW step on an
upstream-structured model (tests/upstream_modules.py), saves the model and optimizer, resumes both
on ours built with the same config, and checks that the next step gives the same parameters."""
import copy
import io

import pytest
import torch

import upstream_modules as up
from uvit_fast.models import DiT, UViT, UViTT2I

# tiny configs with every parameter group: label / context embeddings, time-embedding MLP, skips, conv
CASES = {
    "uvit_uncond": (
        lambda: up.UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=4, num_heads=2,
                        mlp_time_embed=True),
        lambda: UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=4, num_heads=2,
                     mlp_time_embed=True),
    ),
    "uvit_cond": (
        lambda: up.UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=4, num_heads=2, num_classes=11),
        lambda: UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=4, num_heads=2, num_classes=11),
    ),
    "uvit_t2i": (
        lambda: up.UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=4, num_heads=2, t2i=True,
                        clip_dim=12, num_clip_token=5, conv=False),
        lambda: UViTT2I(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=4, num_heads=2, clip_dim=12,
                        num_clip_token=5, conv=False),
    ),
    "dit": (
        lambda: up.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2,
                       num_classes=10),
        lambda: DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2,
                    num_classes=10),
    ),
}


def _batch(name, B=3):
    g = torch.Generator().manual_seed(1)
    C = 3 if name == "uvit_uncond" else 4
    x = torch.randn(B, C, 8, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (B,), generator=g).double()
    if name == "uvit_uncond":
        return (x, t)
    if name == "uvit_t2i":
        return (x, t, torch.randn(B, 5, 12, generator=g, dtype=torch.float64))
    return (x, t, torch.randint(0, 10, (B,), generator=g))


def _step(model, opt, batch):
    opt.zero_grad()
    model(*batch).square().mean().backward()
    opt.step()


def _adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.03, betas=(0.99, 0.99))


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load(data: bytes):
    # a fresh copy per load: load_state_dict keeps tensors that already have the parameter's dtype
    # and device, so two optimizers loaded from one dict would share (and both update) the moments
    return torch.load(io.BytesIO(data), weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_upstream_optimizer_state_resumes_on_ours(name):
    make_up, make_ours = CASES[name]
    torch.manual_seed(0)
    upstream = make_up().double().eval()  # eval: DiT drops labels at random in training mode
    with torch.no_grad():
        for p in upstream.parameters():  # random weights everywhere (DiT zero-initialises some)
            p.normal_(0.0, 0.3)
    opt = _adamw(upstream)
    _step(upstream, opt, _batch(name))  # the optimizer now holds per-parameter state
    saved_model, saved_opt = _save(upstream.state_dict()), _save(opt.state_dict())  # nnet.pth, optimizer.pth

    ours = make_ours().double().eval()
    ours.load_state_dict(_load(saved_model))
    ours_opt = _adamw(ours)
    ours_opt.load_state_dict(_load(saved_opt))
    # every state entry landed on the parameter of its shape (by position, as PyTorch matches it)
    for p in ours.parameters():
        state = ours_opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                assert state[key].shape == p.shape, key

    batch = _batch(name, B=2)
    reference = copy.deepcopy(upstream)
    reference_opt = _adamw(reference)
    reference_opt.load_state_dict(_load(saved_opt))
    _step(reference, reference_opt, batch)
    _step(ours, ours_opt, batch)
    theirs = dict(reference.named_parameters())
    # float64 with the same gradients up to rounding; Adam amplifies rounding only where a gradient is
    # ~0 (the key bias, whose exact gradient is zero): far below the lr-sized error of a wrong mapping
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, theirs[n], rtol=1e-7, atol=1e-8, msg=lambda m: f"{name} {n}: {m}")


def test_misordered_parameters_would_not_resume():
    """The test above can fail: the same state on a model whose parameters are listed in another
    order puts moment tensors on parameters of other shapes, and AdamW's step then raises."""
    upstream = CASES["uvit_cond"][0]().double()
    opt = _adamw(upstream)
    _step(upstream, opt, _batch("uvit_cond"))
    params = list(upstream.parameters())
    shuffled = torch.optim.AdamW([params[3]] + params[:3] + params[4:], lr=1e-2)
    shuffled.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match="size of tensor"):
        _step(upstream, shuffled, _batch("uvit_cond"))
