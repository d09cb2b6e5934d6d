"""The quick subset (``python -m pytest -m "not slow"``) is a real subset that still covers every
op and every model family: parity of each op, opcheck of each op file, and one reference test
of each model family."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what the quick subset must keep: name -> node-id pattern (at least one unmarked test matches)
OPS = {
    "patchify_embed": r"^tests/test_patch_embed\.py::test_embed_parity",
    "decoder_unpatchify": r"^tests/test_patch_embed\.py::test_decoder_parity",
    "adaln_layer_norm": r"^tests/test_adaln_layer_norm\.py::test_adaln_parity\[",
    "residual_adaln_layer_norm": r"^tests/test_adaln_layer_norm\.py::test_residual_parity\[",
    "skip_concat_linear": r"^tests/test_skip_concat_linear\.py::test_parity",
    "attention": r"^tests/test_attention\.py::test_parity_matrix",
    "fused_linear": r"^tests/test_fused_linear\.py::test_linear_every_activation\[",
    "fused_mlp": r"^tests/test_fused_linear\.py::test_mlp_parity\[",
    "fp8_linear": r"^tests/test_fp8\.py::test_linear_every_epilogue\[",
    "fp8_mlp": r"^tests/test_fp8\.py::test_mlp_pair_equals_the_unfused_kernels\[",
    "quantize_fp8": r"^tests/test_fp8\.py::test_quantize_parity\[",
    "adaln fp8 output": r"^tests/test_fp8\.py::test_adaln_fp8_output\[",
}
OPCHECK = {
    "adaln ops": r"^tests/test_adaln_layer_norm\.py::test_opcheck",
    "patch_embed ops": r"^tests/test_patch_embed\.py::test_opcheck",
    "skip_concat_linear": r"^tests/test_skip_concat_linear\.py::test_opcheck",
    "attention ops": r"^tests/test_attention\.py::test_opcheck",
    "fused_linear ops": r"^tests/test_fused_linear\.py::test_opcheck",
    "fp8 ops": r"^tests/test_fp8\.py::test_opcheck",
}
MODELS = {
    "UViT": r"^tests/test_models\.py::test_uvit_matches_reference",
    "UViTT2I": r"^tests/test_models\.py::test_uvit_t2i_matches_reference",
    "DiT": r"^tests/test_models\.py::test_dit_matches_reference",
    "ViT": r"^tests/test_vit_family\.py::test_vit_parity",
    "ViViT": r"^tests/test_vit_family\.py::test_vivit_parity",
    "CLIP": r"^tests/test_vit_family\.py::test_clip_parity",
}

# the blocks' linears routed to fused_linear / fused_mlp (issue 16), per family, and on the Triton kernels
ROUTING = {
    **{f"{f} routing": rf"^tests/test_linear_routing\.py::test_every_block_routes_its_linears\[{f}\]"
       for f in ("uvit", "uvit_t2i", "dit", "vit", "vivit", "clip")},
    "linears on the Triton kernels": r"^tests/test_linear_routing\.py::test_triton_linears_match_plain_within_parity_rule",
    "optimize routing": r"^tests/test_linear_routing\.py::test_optimize_routes_upstream_linears",
}


def _check_layout(quick, total):
    assert len(quick) >= 100, f"the quick subset has only {len(quick)} tests"
    assert len(quick) < total, "nothing is marked slow: -m 'not slow' runs the whole suite"
    assert len(quick) >= total // 4, f"the quick subset keeps {len(quick)} of {total} tests"
    missing = [name for group in (OPS, OPCHECK, MODELS, ROUTING) for name, pattern in group.items()
               if not any(re.search(pattern, nodeid) for nodeid in quick)]
    assert not missing, f"the quick subset (-m 'not slow') runs nothing of: {', '.join(missing)}"


def test_quick_subset_of_this_session(request):
    """When this session collected the whole suite, check its unmarked tests directly."""
    items = request.session.items
    files = {item.nodeid.split("::")[0] for item in items}
    if len(files) < 10:
        pytest.skip("this session did not collect the whole tests/ directory (the slow test below collects it)")
    quick = [item.nodeid for item in items if item.get_closest_marker("slow") is None]
    # under -m "not slow" the slow tests are no longer in session.items: they were deselected
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    deselected = len(reporter.stats.get("deselected", [])) if reporter is not None else 0
    _check_layout(quick, len(items) + deselected)


_COLLECT = """
import sys
import pytest


class Report:
    def pytest_collection_finish(self, session):
        for item in session.items:
            print("ITEM", int(item.get_closest_marker("slow") is not None), item.nodeid)


sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "tests"], plugins=[Report()]))
"""


@pytest.mark.slow
def test_quick_subset_collection_in_a_subprocess(request):
    """The same check where this session collected part of the suite (its own collection, in a
    subprocess: about 30 s of imports on 2 cores)."""
    if len({item.nodeid.split("::")[0] for item in request.session.items}) >= 10:
        pytest.skip("this session collected the whole tests/ directory: test_quick_subset_of_this_session checks it")
    out = subprocess.run([sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line.split(" ", 2) for line in out.stdout.splitlines() if line.startswith("ITEM ")]
    quick = [nodeid for _, slow, nodeid in rows if slow == "0"]
    _check_layout(quick, len(rows))
