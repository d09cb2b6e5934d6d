"""``uvit-fast profile``: FLOP counts against an independent closed form, the CLI, timing, the plot."""
import json
import time

import pytest
import torch

from uvit_fast.cli import main
from uvit_fast.models import list_models, model_config
from uvit_fast import profiler


# ----------------------------------------------------------------------------------------------
# closed form, written from the architectures (upstream-facts), not from the profiler's code


def block(L, D, ratio=4.0):
    """One pre-norm transformer block on L tokens of width D: (MACs, of which attention).
    qkv 3 L D^2 + proj L D^2 + MLP 2 L D (ratio D) (= 12 L D^2 at ratio 4); Q K^T and P V 2 L^2 D."""
    attn = 2 * L * L * D
    return 4 * L * D * D + 2 * L * D * int(D * ratio) + attn, attn


def closed_form(name, img=None, patch=None):
    """(forward multiply-adds of one sample, of which attention matmuls, tokens)."""
    cfg = model_config(name)
    arch = profiler.family(name)
    if arch == "ViT":  # timm ViT: [cls, patches] + pos, blocks, norm, head on the class token
        D, p, S = cfg["embed_dim"], patch or cfg["patch_size"], img or cfg["img_size"]
        C = cfg.get("in_chans", 3)
        L = 1 + (S // p) ** 2
        m, a = block(L, D, cfg.get("mlp_ratio", 4.0))
        macs = (L - 1) * C * p * p * D + cfg["depth"] * m + D * cfg.get("num_classes", 1000)
        return macs, cfg["depth"] * a, L
    if arch == "ViViT":  # tubelets t x p x p; model 1 joint, model 2 spatial per time index + temporal
        D, p, S = cfg["embed_dim"], patch or cfg["patch_size"], img or cfg["img_size"]
        t, T, C = cfg.get("tubelet_size", 2), cfg.get("num_frames", 32), cfg.get("in_chans", 3)
        nt, hw = T // t, (S // p) ** 2
        macs = nt * hw * C * t * p * p * D + D * cfg.get("num_classes", 400)
        if cfg.get("variant", 1) == 1:
            L = 1 + nt * hw
            m, a = block(L, D)
            return macs + cfg["depth"] * m, cfg["depth"] * a, L
        L = 1 + hw
        ms, as_ = block(L, D)
        mt, at = block(1 + nt, D)
        depth, tdepth = cfg["depth"], cfg.get("temporal_depth", 4)
        return macs + nt * depth * ms + tdepth * mt, nt * depth * as_ + tdepth * at, L
    if arch == "CLIP":  # image tower (no conv bias) + causal text tower (full L^2 counted) + projections
        W, p, S = cfg["vision_width"], patch or cfg["patch_size"], img or cfg["img_size"]
        E, Wt, Lt = cfg["embed_dim"], cfg["transformer_width"], cfg.get("context_length", 77)
        L = 1 + (S // p) ** 2
        mv, av = block(L, W)
        mt, at = block(Lt, Wt)
        macs = (L - 1) * 3 * p * p * W + cfg["vision_layers"] * mv + W * E
        macs += cfg["transformer_layers"] * mt + Wt * E
        macs += E  # image-text logits for one pair
        return macs, cfg["vision_layers"] * av + cfg["transformer_layers"] * at, L
    if arch == "DiT":  # DiT: adaLN-Zero blocks; t-embedder 256 -> D -> D; label table is a lookup
        D, depth = cfg["hidden_size"], cfg["depth"]
        p = patch or cfg["patch_size"]
        S = img or cfg.get("input_size", 32)
        C = cfg.get("in_channels", 4)
        c_out = 2 * C if cfg.get("learn_sigma", True) else C
        hidden = int(D * cfg.get("mlp_ratio", 4.0))
        L = (S // p) ** 2
        attn = depth * 2 * L * L * D                       # Q K^T and P V
        macs = L * C * p * p * D                           # patch-embedding conv
        macs += 256 * D + D * D                            # timestep MLP
        macs += depth * (4 * L * D * D + 2 * L * D * hidden + D * 6 * D)  # qkv, proj, mlp, adaLN
        macs += attn
        macs += D * 2 * D + L * D * p * p * c_out          # final adaLN and linear
        return macs, attn, L
    assert arch in ("UViT", "UViTT2I"), f"no closed form for {name} ({arch}): add one to this test"
    D, depth = cfg["embed_dim"], cfg["depth"]
    p = patch or cfg["patch_size"]
    S = img or cfg["img_size"]
    C = cfg["in_chans"]
    hidden = int(D * cfg.get("mlp_ratio", 4.0))
    N = (S // p) ** 2
    text = "clip_dim" in cfg
    extras = 1 + cfg.get("num_clip_token", 77) if text else (2 if cfg.get("num_classes", -1) > 0 else 1)
    L = N + extras
    blocks = 2 * (depth // 2) + 1                          # in-blocks, mid-block, out-blocks
    attn = blocks * 2 * L * L * D
    macs = N * C * p * p * D                               # patch-embedding conv (patches only)
    if cfg.get("mlp_time_embed", False):
        macs += 8 * D * D
    if text:
        macs += cfg.get("num_clip_token", 77) * cfg.get("clip_dim", 768) * D   # context embedding
    macs += blocks * (4 * L * D * D + 2 * L * D * hidden) + attn            # 12 L D^2 at ratio 4
    if cfg.get("skip", True):
        macs += (depth // 2) * L * 2 * D * D               # long-skip linears (2D -> D) in the out-blocks
    macs += L * D * p * p * C                              # decoder_pred on every token (as upstream)
    if cfg.get("conv", True):
        macs += 9 * C * C * S * S                          # final 3x3 conv
    return macs, attn, L


#: the presets the quick subset keeps (one of each kind: U-ViT, U-ViT-T2I, DiT, ViT, ViViT, CLIP)
_QUICK_PRESETS = {"imagenet256_uvit_huge", "mscoco_uvit_small", "DiT-XL/2", "vit_base_patch16_224",
                  "vivit_b_16x2_model2", "clip_vit_b32"}


def _quick_once(names):
    """Every name; the quick subset keeps one preset of each kind, the others are slow."""
    return [n if n in _QUICK_PRESETS else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _quick_once(list_models()))
def test_every_model_matches_closed_form(name):
    row = profiler.count_flops(name)
    macs, attn, tokens = closed_form(name)
    assert row["flops"] == 2 * macs, f"{name}: counter {row['flops'] / 2} MACs vs closed form {macs}"
    assert row["gmacs"] == pytest.approx(macs / 1e9, rel=1e-12)
    assert row["gflops"] == pytest.approx(2 * row["gmacs"], rel=1e-12)
    assert row["tokens"] == tokens
    assert row["attn_share"] == pytest.approx(attn / macs, rel=1e-9)


@pytest.mark.parametrize(
    "name,img,patch",
    [
        ("imagenet256_uvit_huge", None, 1),
        ("imagenet256_uvit_huge", None, 8),
        ("imagenet512_uvit_huge", 64, 2),
        ("mscoco_uvit_small", None, 4),
        ("DiT-XL/2", 64, 4),
        ("DiT-S/8", 16, 2),
        ("vit_base_patch16_224", 384, 32),
        ("vivit_b_16x2_model2", 112, 8),
        ("clip_vit_b32", 336, 14),
    ],
)
def test_other_sizes_match_closed_form(name, img, patch):
    row = profiler.count_flops(name, img, patch)
    macs, attn, tokens = closed_form(name, img, patch)
    assert (row["flops"], row["tokens"]) == (2 * macs, tokens)
    assert row["attn_share"] == pytest.approx(attn / macs, rel=1e-9)


@pytest.mark.slow
def test_published_numbers():
    """The papers' "GFLOPs" (= GMACs) and parameter counts."""
    expect = {  # name: (GMACs, params in millions)
        "imagenet256_uvit_huge": (133, 501),
        "DiT-XL/2": (118.6, 675),
        "DiT-L/2": (80.7, 458),
        "DiT-B/4": (5.56, 130),
        "DiT-S/8": (0.36, 33),
        "vit_base_patch16_224": (17.6, 86.6),
        "vit_large_patch16_224": (61.6, 304),
    }
    for name, (gmacs, mparams) in expect.items():
        row = profiler.count_flops(name)
        assert row["gmacs"] == pytest.approx(gmacs, rel=0.01), name
        assert row["params"] / 1e6 == pytest.approx(mparams, rel=0.01), name


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("name", ["imagenet256_uvit_huge", "DiT-XL/2"])
def test_cli_json(name, capsys):
    assert main(["profile", "--model", name, "--json", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])
    macs, _, tokens = closed_form(name)
    assert row["model"] == name and row["tokens"] == tokens
    assert row["gmacs"] == pytest.approx(macs / 1e9, rel=1e-12)
    assert row["gflops"] == pytest.approx(2 * macs / 1e9, rel=1e-12)
    assert {"img_size", "patch_size", "params", "attn_share"} <= set(row)
    # kernel launches per forward, fused and plain (tests/test_launch_count.py proves the counts)
    launches = profiler.count_launches(name, fused=True)
    assert row["launches_fused"] == launches["launches"] and row["launches_fused_triton"] == launches["triton"]
    assert row["launches_plain"] == profiler.count_launches(name, fused=False)["launches"]


def test_table_has_launch_columns(capsys):
    assert main(["profile", "--model", "DiT-S/8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "launches fused (Triton)" in out and "launches plain" in out
    row = profiler.profile([profiler.Plan("DiT-S/8")], progress=False)[0]
    line = next(line for line in out.splitlines() if line.startswith("DiT-S/8"))
    assert f"{row['launches_fused']} ({row['launches_fused_triton']})" in line and str(row["launches_plain"]) in line


def test_cli_patch_sweep_and_several_models(capsys):
    assert main(["profile", "--model", "DiT-B/2,cifar10_uvit_small", "--patch-sizes", "2,4,8", "--json", "--no-progress"]) == 0
    rows = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert [(r["model"], r["patch_size"]) for r in rows] == [
        ("DiT-B/2", 2), ("DiT-B/2", 4), ("DiT-B/2", 8),
        ("cifar10_uvit_small", 2), ("cifar10_uvit_small", 4), ("cifar10_uvit_small", 8),
    ]
    assert [r["tokens"] for r in rows] == [256, 64, 16, 257, 65, 17]
    gm = [r["gmacs"] for r in rows]
    assert gm[0] > gm[1] > gm[2] and gm[3] > gm[4] > gm[5]


@pytest.mark.slow
def test_default_run_table_and_plot(tmp_path, capsys):
    png = tmp_path / "flops.png"
    t0 = time.perf_counter()
    assert main(["profile", "--json", "--no-progress", "--plot", str(png)]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 100, f"default profile took {elapsed:.0f} s"
    rows = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    names = {r["model"] for r in rows}
    uvit_dit = {n for n in list_models() if profiler.family(n) in ("UViT", "UViTT2I", "DiT")}
    assert names == uvit_dit  # every U-ViT and DiT preset at its own size ...
    sweep = sorted(r["patch_size"] for r in rows if r["model"] == "imagenet256_uvit_huge")
    assert sweep == [1, 2, 4, 8]  # ... plus the U-ViT-H patch sweep
    # the PNG exists and is a PNG
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # the figure: log-log, labelled axes, one line per model (DiT-XL/2, /4, /8 are one model)
    fig = profiler.make_figure(rows)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "tokens" in ax.get_xlabel() and "GFLOPs" in ax.get_ylabel()
    series = {r["series"] for r in rows}
    assert "DiT-XL" in series and "DiT-XL/2" not in series
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(x for x in legend if "reference" not in x) == sorted(series)
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert list(lines["imagenet256_uvit_huge"].get_xdata()) == [18, 66, 258, 1026]
    check_plot_design(ax, rows)


def check_plot_design(ax, rows):
    """Issue 13: every preset visible. One marker per family, distinct colours within a family,
    presets drawn on the same point named together in one label, reference slopes L and L^2."""
    import math

    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    arch = {r["series"]: r["arch"] for r in rows}
    markers = {}
    for name, fam in arch.items():
        markers.setdefault(fam, set()).add(lines[name].get_marker())
    assert all(len(m) == 1 for m in markers.values())  # one marker per family ...
    assert len({next(iter(m)) for m in markers.values()}) == len(markers)  # ... and a different one each
    for fam in markers:  # within a family every line has its own colour
        colours = [lines[n].get_color() for n, f in arch.items() if f == fam]
        assert len(set(colours)) == len(colours), fam
    # the two reference slopes: exactly 1 and 2 in log-log
    for label, power in (("∝ L (reference slope)", 1), ("∝ L² (reference slope)", 2)):
        (x0, x1), (y0, y1) = lines[label].get_xdata(), lines[label].get_ydata()
        assert math.log(y1 / y0) / math.log(x1 / x0) == pytest.approx(power)
    # points that coincide (same tokens, GFLOPs within 6%) are named together in one annotation
    texts = [t.get_text() for t in ax.texts]
    by_point = {}
    for r in rows:
        by_point.setdefault(r["tokens"], []).append(r)
    for group in by_point.values():
        for a in group:
            close = [b["model"] for b in group if abs(math.log(b["gflops"] / a["gflops"])) < 0.03]
            if len(close) > 1:
                assert any(all(name in t for name in close) for t in texts), close


@pytest.mark.slow
def test_plot_names_coinciding_presets():
    """imagenet256_uvit_huge/2 and imagenet512_uvit_huge/4 (258 tokens each), and the three
    *_uvit_large presets, land on one point: they are drawn as rings and named in one label."""
    names = ["imagenet256_uvit_huge", "imagenet512_uvit_huge", "imagenet64_uvit_large", "imagenet256_uvit_large",
             "imagenet512_uvit_large", "mscoco_uvit_small", "DiT-S/2", "DiT-S/4", "DiT-B/2"]
    rows = profiler.profile(profiler.make_plan(names, None, None), progress=False)
    fig = profiler.make_figure(rows)
    (ax,) = fig.axes
    texts = [t.get_text() for t in ax.texts]
    assert any("imagenet256_uvit_huge p2" in t and "imagenet512_uvit_huge p4" in t for t in texts)
    assert any(all(f"imagenet{s}_uvit_large" in t for s in (64, 256, 512)) for t in texts)
    check_plot_design(ax, rows)


def test_plot_memory_panel():
    """With the --memory fields, a second panel: saved activations per sample vs tokens, fused
    (solid) and plain (dashed), one pair of lines per model."""
    rows = profiler.profile(profiler.make_plan(["DiT-S/2"], None, [2, 4]), progress=False)
    for r in rows:  # the panel draws what the rows say; values shaped like the real ones
        r["saved_bytes_fused"], r["saved_bytes_plain"] = r["tokens"] * 2**16, r["tokens"] * 2**17
    fig = profiler.make_figure(rows)
    flops_ax, mem_ax = fig.axes
    assert "Activation memory" in mem_ax.get_title() and "per sample" in mem_ax.get_ylabel()
    lines = {line.get_label(): line for line in mem_ax.get_lines()}
    assert lines["DiT-S fused"].get_linestyle() == "-" and lines["DiT-S plain"].get_linestyle() == "--"
    assert list(lines["DiT-S fused"].get_xdata()) == [64, 256]
    assert list(lines["DiT-S plain"].get_ydata()) == [64 * 2**17 / 2**20, 256 * 2**17 / 2**20]
    assert "∝ L (reference slope)" in lines and "∝ L² (reference slope)" in lines
    check_plot_design(flops_ax, rows)


def test_plot_point_labels_name_the_patch_size():
    """A DiT at another patch size than its name's is not labelled as the named preset:
    DiT-XL/2 built at patch 4 (64 tokens) is 'DiT-XL/2 p4', not 'DiT-XL/2'."""
    label = profiler._point_label
    assert label({"model": "DiT-XL/2", "patch_size": 2}) == "DiT-XL/2"
    assert label({"model": "DiT-XL/2", "patch_size": 4}) == "DiT-XL/2 p4"
    assert label({"model": "DiT-S/8", "patch_size": 8}) == "DiT-S/8"
    assert label({"model": "imagenet256_uvit_huge", "patch_size": 2}) == "imagenet256_uvit_huge p2"


def test_plot_colours_differ_across_families_when_they_fit():
    """The acceptance plot (U-ViT-H/2 and DiT-XL/2 with --memory) draws both models' fused lines
    solid in the memory panel: they need different colours, not each its family's first one. With
    more lines than colours (the default run's 14), colours still differ within each family."""
    two = [{"series": "imagenet256_uvit_huge", "arch": "UViT"}, {"series": "DiT-XL", "arch": "DiT"}]
    colours = profiler.series_colors(two)
    assert colours["imagenet256_uvit_huge"] != colours["DiT-XL"]
    many = ([{"series": f"u{i}", "arch": "UViT"} for i in range(8)] + [{"series": f"t{i}", "arch": "UViTT2I"}
            for i in range(2)] + [{"series": f"d{i}", "arch": "DiT"} for i in range(4)])
    colours = profiler.series_colors(many)
    for fam in ("UViT", "UViTT2I", "DiT"):
        mine = [colours[r["series"]] for r in many if r["arch"] == fam]
        assert len(set(mine)) == len(mine), fam


@pytest.mark.parametrize(
    "path,match",
    [
        ("/no/such/dir/f.png", "--plot /no/such/dir/f.png: folder /no/such/dir does not exist"),
        ("{tmp}/f.txt", "the file name must end in .png, .pdf, .svg"),
        ("{tmp}", "the file name must end in"),
    ],
)
def test_bad_plot_path_fails_before_the_work(path, match, tmp_path, capsys, monkeypatch):
    counted = []
    monkeypatch.setattr(profiler, "count_flops", lambda *a, **k: counted.append(a))
    assert main(["profile", "--no-progress", "--plot", path.format(tmp=tmp_path)]) == 2
    captured = capsys.readouterr()
    assert counted == [] and captured.out == ""  # nothing was counted or printed
    assert match in captured.err and captured.err.count("\n") == 1  # one line


@pytest.mark.slow
def test_bad_plot_path_cli_exit_code(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "profile", "--plot", "/no/such/dir/f.png"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "uvit-fast profile: --plot /no/such/dir/f.png: folder /no/such/dir does not exist"]


def test_default_table_is_readable(capsys):
    assert main(["profile", "--model", "imagenet256_uvit_huge", "--patch-sizes", "1,2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "GMACs" in out and "GFLOPs" in out and "attn %" in out
    assert "133.20" in out and "266.39" in out and "1026" in out


@pytest.mark.slow
def test_batch_timing_on_this_device(capsys):
    assert main(["profile", "--model", "DiT-S/8,DiT-XL/2", "--batch", "1", "--json", "--no-progress"]) == 0
    small, big = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert small["batch"] == 1 and small["ms"] > 0
    assert small["samples_per_s"] == pytest.approx(1e3 / small["ms"])
    assert small["tflops"] == pytest.approx(small["gflops"] / small["ms"])
    if torch.cuda.is_available():
        assert small["device"] == torch.cuda.get_device_name()
    else:
        assert small["device"].startswith("CPU")
        assert "ms" not in big and "--force" in big["timing_skipped"]  # too big for a CPU


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "DiT-S/8", "--patch-sizes", "3"], "patch size 3 does not divide the image size 32 of DiT-S/8"),
        (["--model", "imagenet256_uvit_huge", "--img-size", "31"], "patch size 2 does not divide the image size 31"),
        (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    ],
)
def test_bad_arguments(argv, match, capsys):
    assert main(["profile", "--no-progress", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--patch-sizes", "2,x"], ["--patch-sizes", "0"], ["--batch", "0"], ["--img-size", "-1"]])
def test_bad_argument_types(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["profile", *argv])
    assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_build_model_errors():
    with pytest.raises(ValueError, match="patch size 5 does not divide the image size 32 of DiT-XL/2"):
        profiler.count_flops("DiT-XL/2", None, 5)
    with pytest.raises(ValueError, match="unknown model 'x'"):
        profiler.count_flops("x")


def test_small_rates_keep_their_digits():
    """A CPU's forward rate (about 0.0015 TFLOP/s) must not print as 0.00."""
    from uvit_fast.profiler import format_table

    row = {"model": "DiT-S/8", "img_size": 32, "patch_size": 8, "tokens": 16, "params": 33_100_000, "gmacs": 0.36,
           "gflops": 0.72, "attn_share": 0.007, "device": "CPU", "batch": 2, "ms": 963.0, "samples_per_s": 2.1,
           "tflops": 0.0015}
    assert format_table([row]).splitlines()[-1].split()[-1] == "0.0015"
    assert format_table([{**row, "tflops": 312.456}]).splitlines()[-1].split()[-1] == "312.46"


@pytest.mark.parametrize("name, kw", [
    ("DiT-S/8", dict(depth=2, hidden_size=64, num_heads=2, input_size=16)),
    ("cifar10_uvit_small", dict(depth=3, embed_dim=64, num_heads=2, img_size=8, patch_size=4)),
])
def test_flop_counter_sees_the_same_forward_flops_on_the_kernels(name, kw):
    """FlopCounterMode over a fused model on its Triton ops (interpreter) counts what the PyTorch path
    counts: every op has a FLOP formula (patchify_embed, decoder_unpatchify and skip_concat_linear had
    none, and a fused DiT counted 29% fewer FLOPs; found by review)."""
    import uvit_fast
    from torch.utils.flop_counter import FlopCounterMode

    model = uvit_fast.create_model(name, **kw).eval()
    inputs = model.example_inputs(2)
    flops = {}
    for backend in ("triton", "torch"):
        with FlopCounterMode(display=False) as counter, uvit_fast.use_backend(backend), torch.no_grad():
            model(*inputs)
        flops[backend] = counter.get_total_flops()
    assert flops["triton"] == flops["torch"] > 0, flops
