"""The DDIM sampler and the sampling example."""
import importlib.util
import pathlib

import pytest
import torch

from uvit_fast.sampling import ddim_sample, linear_betas, null_label, sd_betas
import uvit_fast


def _oracle(x0, betas):
    abar = torch.cumprod(1 - betas, 0)

    def model(x, t, cond=None):
        a = abar[t.long()].to(x.dtype).view(-1, 1, 1, 1)
        reps = x.shape[0] // x0.shape[0]  # the guided batch is [cond, uncond]
        target = x0 if cond is None else x0.repeat(reps, 1, 1, 1) * cond.view(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("betas", [linear_betas(), sd_betas()])
def test_ddim_recovers_x0_with_an_oracle_eps(betas):
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    out = ddim_sample(_oracle(x0, betas), noise, steps=7, betas=betas)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)


def test_guidance_extrapolates_between_branches():
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    cond, null = torch.tensor([2.0, 2.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    noise = torch.randn_like(x0)
    out = ddim_sample(_oracle(x0, linear_betas()), noise, steps=5, cond=cond, null_cond=null, cfg_scale=3.0)
    # eps is linear in the target, so guidance gives the oracle of x0 * (1 + 3 * (2 - 1)) = 4 x0
    torch.testing.assert_close(out, 4 * x0, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs both cond and null_cond"):
        ddim_sample(_oracle(x0, linear_betas()), noise, cfg_scale=2.0)


def _meta(name, **kw):
    with torch.device("meta"):
        return uvit_fast.create_model(name, depth=1, **kw)


def test_null_label():
    assert null_label(_meta("DiT-S/8")) == 1000
    assert null_label(_meta("imagenet256_uvit_large")) == 1000
    with pytest.raises(ValueError, match="not class-conditional"):
        null_label(_meta("cifar10_uvit_small"))
    # ImageNet-64 U-ViTs have the 1000 real classes only: 999 is not a null class
    with pytest.raises(ValueError, match="this U-ViT has 1000 classes and no known null class"):
        null_label(_meta("imagenet64_uvit_mid"))
    with pytest.raises(ValueError, match=r"the DiT has no null class \(class_dropout_prob=0"):
        null_label(_meta("DiT-S/8", class_dropout_prob=0.0))


def _load_example():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "sample_ddim.py"
    spec = importlib.util.spec_from_file_location("sample_ddim", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "name, schedule, cfg, null",
    [("imagenet64_uvit_mid", linear_betas, 1.0, None),  # pixel model, no null class: no guidance
     ("imagenet256_uvit_large", sd_betas, 3.0, 1000),   # latent model, null class 1000
     ("DiT-S/8", linear_betas, 3.0, 1000)],
)
def test_sampling_example_picks_schedule_and_guidance(name, schedule, cfg, null, monkeypatch):
    mod = _load_example()
    seen = {}
    monkeypatch.setattr(mod, "ddim_sample", lambda model, noise, **kw: seen.update(kw) or noise)
    mod.main(["--model", name, "--depth", "1", "--steps", "1", "--batch", "1", "--cfg", "3"])
    torch.testing.assert_close(seen["betas"], schedule())
    assert seen["cfg_scale"] == cfg
    assert (seen["null_cond"] is None) if null is None else seen["null_cond"].tolist() == [null]


@pytest.mark.slow
def test_sampling_example_runs_end_to_end():
    mod = _load_example()
    out = mod.main(["--model", "imagenet64_uvit_mid", "--depth", "2", "--steps", "2", "--batch", "1"])
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
