"""benchmarks/validate_report.py: each configuration keeps its own section of results.md and rows of results.json."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
validate_report = pytest.importorskip("validate_report")


def _rows(mode: str, fid: float) -> list[dict]:
    base = dict(mode=mode, kimg=1.0, arch="small", num_ref=10, kid=0.1, kid_std=0.01, swd=0.2,
                memorized_share=0.0, memorized_share_strict=0.0, train_s=60.0, sample_s=6.0)
    return [{**base, "table": "reference", "method": "real-test", "p": 0.0, "delta": 0.0, "kimg": None, "fid": 1.0},
            {**base, "table": "main", "method": "ambient", "p": 0.8, "delta": 0.1, "fid": fid}]


def _meta(mode: str) -> dict:
    return dict(mode=mode, command=f"python validate.py --mode {mode}", date="2026-11-29", machine="x86_64",
                torch_threads=2, wall_s=60.0, arch="small", batch=32, lr=2e-3, kimg=1.0, seed=0, delta=0.1,
                num_samples=8, num_ref=10, threshold=0.95, strict_threshold=0.99, ablation_samples=4)


def test_modes_keep_their_own_sections_and_rows(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    variant = {"mode": "medium", "table": "variant", "method": "ambient-d0", "fid": 318.3}
    (docs / "results.json").write_text(json.dumps([variant]))
    (docs / "results.md").write_text("# Title\n\nProse before.\n")
    validate_report.write_docs(docs, _rows("medium", 226.5), _meta("medium"))
    validate_report.write_docs(docs, _rows("full", 150.0), _meta("full"))
    text = (docs / "results.md").read_text()
    assert text.startswith("# Title\n\nProse before.\n")
    assert text.index("## Results: medium") < text.index("## Results: full")
    assert "| 226.5 |" in text and "| 150.0 |" in text
    assert "docs/fashion_mnist_medium.png" in text and "docs/fashion_mnist.png" in text

    # a rerun of one mode replaces that mode's section in place and its measured rows, nothing else
    validate_report.write_docs(docs, _rows("medium", 200.0), _meta("medium"))
    again = (docs / "results.md").read_text()
    assert "| 226.5 |" not in again and "| 200.0 |" in again and "| 150.0 |" in again
    assert again.index("## Results: medium") < again.index("## Results: full")
    assert again.count("## Results: medium") == 1
    rows = json.loads((docs / "results.json").read_text())
    assert [(r["mode"], r["table"], r["fid"]) for r in rows] == [
        ("medium", "variant", 318.3), ("full", "reference", 1.0), ("full", "main", 150.0),
        ("medium", "reference", 1.0), ("medium", "main", 200.0)]
    assert not list(docs.glob(".*tmp*")), "atomic writes leave no temp files"


def test_rerun_of_some_models_keeps_the_others_dated(tmp_path):
    docs = tmp_path / "docs"
    first = _rows("full", 150.0) + [{**_rows("full", 80.0)[1], "method": "clean", "p": 0.0, "delta": 0.0},
                                    {**_rows("full", 90.0)[1], "p": 0.9}]
    validate_report.write_docs(docs, first, _meta("full"))
    again = [{**r, "loss_weighting": "tilted"} for r in _rows("full", 120.0)]
    meta = {**_meta("full"), "date": "2026-12-04 19:00 UTC", "keep_others": True}
    validate_report.write_docs(docs, again, meta)
    text = (docs / "results.md").read_text()
    assert "| 150.0 |" not in text, "the rerun model's old row is replaced"
    assert "| ambient | 0.8 | 0.1 | tilted | 2026-12-04 | 120.0 |" in text
    assert "| clean | 0 | 0 | — | 2026-11-29 | 80.0 |" in text, "the model not rerun stays, with its date"
    assert "| ambient | 0.9 | 0.1 | edm | 2026-11-29 | 90.0 |" in text, "before --loss-weighting: edm"
    rows = json.loads((docs / "results.json").read_text())
    assert sorted((r["method"], r["measured"]) for r in rows if r["table"] == "main") == [
        ("ambient", "2026-11-29"), ("ambient", "2026-12-04"), ("clean", "2026-11-29")]
    # without --methods a run replaces the whole section, as before (no dated columns)
    validate_report.write_docs(docs, _rows("full", 110.0), {**_meta("full"), "date": "2026-12-05 10:00 UTC"})
    text = (docs / "results.md").read_text()
    assert "| clean |" not in text and "measured |" not in text and "| 110.0 |" in text


def test_a_cosine_schedule_row_is_another_model(tmp_path):
    docs = tmp_path / "docs"
    validate_report.write_docs(docs, [{**r, "loss_weighting": "tilted"} for r in _rows("full", 150.0)], _meta("full"))
    cosine = [{**r, "loss_weighting": "tilted", "lr_schedule": "cosine"} for r in _rows("full", 120.0)]
    validate_report.write_docs(docs, cosine, {**_meta("full"), "date": "2026-12-04 23:00 UTC", "keep_others": True})
    text = (docs / "results.md").read_text()
    assert "| ambient | 0.8 | 0.1 | tilted, cosine lr | 2026-12-04 | 120.0 |" in text
    assert "| ambient | 0.8 | 0.1 | tilted | 2026-11-29 | 150.0 |" in text, "the constant-rate model's row stays"
    rows = json.loads((docs / "results.json").read_text())
    assert sorted((r["fid"], r.get("lr_schedule")) for r in rows if r["table"] == "main") == [
        (120.0, "cosine"), (150.0, None)]


def test_bad_results_json_names_the_file(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="results.json: not valid JSON"):
        validate_report.write_docs(tmp_path, _rows("quick", 1.0), _meta("quick"))
    assert not (tmp_path / "results.md").exists()


def test_partial_run_is_labelled(tmp_path):
    validate_report.write_docs(tmp_path, _rows("quick", 1.0), {**_meta("quick"), "complete": False})
    assert "**Partial:**" in (tmp_path / "results.md").read_text()
    validate_report.write_docs(tmp_path, _rows("quick", 1.0), {**_meta("quick"), "complete": True})
    assert "**Partial:**" not in (tmp_path / "results.md").read_text()


def test_validate_refuses_bad_results_json_before_training(tmp_path):
    validate = pytest.importorskip("validate")
    (tmp_path / "results.json").write_text("[1,")
    with pytest.raises(SystemExit, match="results.json: not valid JSON"):
        validate.main(["--quick", "--docs-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs").exists()


def test_benchmark_model_keys_name_the_learning_rate_schedule():
    """validate.py follows ambient train's default (cosine): its models' folders say so, and --lr-schedule constant
    finds the folders trained before (keys without a suffix); weighting.py grades a cosine ambient model against
    the cosine baselines when it has them."""
    validate = pytest.importorskip("validate")
    weighting = pytest.importorskip("weighting")
    keys = [m.key for m in validate.methods_for(validate.parse_args(["--mode", "full"]))]
    assert "clean-p0-cosine" in keys and "ambient-p0.8-d0.1-tilted-cosine" in keys and "naive-p0.9-cosine" in keys
    keys = [m.key for m in validate.methods_for(validate.parse_args(["--mode", "full", "--lr-schedule", "constant"]))]
    assert {"clean-p0", "naive-p0.8", "ambient-p0.8-d0.1-tilted"} <= set(keys)
    rows = [{"case": "dust", "method": m, "kid": k} for m, k in
            (("clean", 0.1), ("naive", 0.5), ("clean-cosine", 0.05), ("naive-cosine", 0.45),
             ("ambient-tilted", 0.3), ("ambient-tilted-cosine", 0.25))]
    assert weighting.gap(rows, rows[4]) == "0.50" and weighting.gap(rows, rows[5]) == "0.50"
    assert weighting.gap(rows[:2] + rows[4:], rows[5]) == f"{(0.5 - 0.25) / 0.4:.2f}"  # no cosine baselines


def test_the_validation_figure_shows_the_models_of_the_runs_schedule(monkeypatch):
    validate = pytest.importorskip("validate")
    args = validate.parse_args(["--mode", "full", "--probs", "0.8"])
    u8 = torch.zeros(12, 1, 28, 28, dtype=torch.uint8)
    samples = {"clean-p0-cosine": u8, "naive-p0.8-cosine": u8, "ambient-p0.8-d0.1-tilted-cosine": u8,
               "ambient-p0.8-d0.1-tilted": u8}
    monkeypatch.setattr(validate, "corrupted_examples", lambda p, delta, n, seed: u8)  # no data set needed
    labels = [label for label, _ in validate.figure_rows(args, samples)]
    assert labels == ["clean data", "corrupted p=0.8", "naive p=0.8", "ambient p=0.8", "clean-trained"]
