"""benchmarks/operators.py end to end at a toy size (its smoke mode): every row is produced and scored."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import operators as bench  # noqa: E402


def test_smoke_mode_writes_every_row(tmp_path):
    bench.main(["--mode", "smoke", "--out-dir", str(tmp_path / "runs"), "--docs-dir", str(tmp_path), "--threads", "1"])
    out = json.loads((tmp_path / "operators_smoke.json").read_text())
    methods = [r["method"] for r in out["rows"]]
    assert methods[0].startswith("clean phantoms")
    for want in ("zero-filled", "TV-CS", "Gaussian (EM lap 0)", "EM prior", "clean prior", "ambient k-space"):
        assert any(m.startswith(want) for m in methods), (want, methods)
    for r in out["rows"][1:]:
        assert r["R"] == 4 and math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    assert "| 4 | zero-filled |" in (tmp_path / "operators_smoke.md").read_text()


@pytest.mark.slow  # ~15 s on one core: six tiny models built and trained
def test_smoke_mode_fashion_blur_and_noise(tmp_path):
    """--case blur and --case noise (issue 25 item 5) at a toy size: every row is produced, KID'd and restored; their
    tables sit between markers in the same page, and the MRI case's rewrite of that page keeps them."""
    common = ["--mode", "smoke", "--out-dir", str(tmp_path / "runs"), "--docs-dir", str(tmp_path), "--threads", "1"]
    for case in ("blur", "noise"):
        bench.main([*common, "--case", case])
    for case, what in (("blur", "blurred + noisy"), ("noise", "noisy")):
        rows = json.loads((tmp_path / f"operators_{case}_smoke.json").read_text())["rows"]
        methods = [r["method"] for r in rows]
        wanted = ("clean test images", f"the {what} observations", "naive", "Gaussian (EM lap 0)", "EM (", "clean (")
        for want in wanted:
            assert any(m.startswith(want) for m in methods), (want, methods)
        for r in rows:
            if r["method"].startswith(("naive", "EM", "clean (")):
                assert math.isfinite(r["kid"]) and math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1, r
        assert (case == "noise") == any(m.startswith("noisy-ambient") for m in methods)
    args = bench.parse_args(["--mode", "smoke", "--docs-dir", str(tmp_path)])
    bench.publish(args, [{"R": None, "method": "clean phantoms (held out)", "prior_swd": 0.1}], [], 0.0)
    page = (tmp_path / "operators_smoke.md").read_text()
    for case in ("blur", "noise"):
        start, end = bench.fashion_marker(case)
        assert page.count(start) == 1 and page.count(end) == 1 and page.index(start) < page.index(end)
    assert "| naive (train on the blurred + noisy images) |" in page and "| – | clean phantoms (held out) |" in page


def test_estep_cost_per_operator_runs_and_counts_calls(tmp_path):
    """benchmarks/estep_cost.py --operators at a toy size: a row per operator, each with the plain sampler's forward
    calls plus one VJP per call (1 CG iteration), and its time over the mask row's."""
    import estep_cost

    out = tmp_path / "cost.json"
    estep_cost.main(["--arch", "tiny", "--resolution", "16", "--batch", "2", "--steps", "3", "--rounds", "1",
                     "--no-before", "--operators", "mask", "blur", "kspace", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"plain", "mmps", "mmps mask", "mmps blur", "mmps kspace"}
    for name in ("mmps mask", "mmps blur", "mmps kspace"):
        assert rows[name]["forward"] == rows["plain"]["forward"] == 5 and rows[name]["vjp"] == 5
        assert rows[name]["ratio_to_mask"] > 0 and math.isfinite(rows[name]["ratio_to_plain"])
