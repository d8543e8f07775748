"""benchmarks/operators.py end to end at a toy size (its smoke mode): every row is produced and scored."""

import json
import math
import sys
from pathlib import Path

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
