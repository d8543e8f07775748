"""Every folder a command writes records its kind; no command writes into a folder of another kind
(ambient.folders). Refusals: exit 2, one line naming the folder and its kind, nothing changed."""

import hashlib
import json
from pathlib import Path

import pytest

from ambient import folders
from ambient.cli import main
from ambient.data.corruption import Corruption
from ambient.nets.registry import ModelConfig, SamplingSpec, build_denoiser
from ambient.store.snapshots import save_snapshot
from tests.helpers_cli import FIXTURES, run
from tests.helpers_data import write_npz

TINY = ["--arch", "tiny", "--batch", "8", "--snapshot-kimg", "0.016", "--tick-kimg", "0.008",
        "--grid-samples", "0", "--no-progress", "--device", "cpu"]


def tree(root: Path) -> dict:
    """Every file under ``root`` (hidden ones too) with the digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def fake_import(path: Path, kind_recorded: bool = False) -> Path:
    """An imported model folder as ``ambient import`` wrote it before kinds were recorded."""
    model = ModelConfig(arch="tiny", resolution=8)
    config = {"model": model.to_dict(), "sampling": SamplingSpec(Corruption("dust", 0.5, 0.1)).to_dict(),
              "imported": {"source": "x.pkl", "sha256": "0", "format": "ambient"}}
    if kind_recorded:
        config = folders.stamped(config, folders.IMPORTED_MODEL)
    return save_snapshot(path, config=config, model=build_denoiser(model).state_dict())


def fake_em_run(path: Path) -> Path:
    """An em run folder as an older ambient em left it (no kind recorded)."""
    path.mkdir(parents=True)
    (path / "em_config.json").write_text(json.dumps({"em": {"laps": 2}, "data": {"fingerprint": "x"}}))
    (path / "stats.jsonl").write_text(json.dumps({"lap": 0, "mstep_loss": 0.1}) + "\n")
    return path


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    data = write_npz(root / "d.npz")
    out = root / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.016",
              "--corruption-probability", "0.5", *TINY])
    assert exc.value.code == 0
    return data, out


def test_train_records_its_kind_in_the_run_and_its_snapshots(train_run):
    _, out = train_run
    assert json.loads((out / "config.json").read_text())["kind"] == "train-run"
    snap = next(out.glob("snapshot-*"))
    assert json.loads((snap / "config.json").read_text())["kind"] == "train-snapshot"
    assert folders.folder_kind(out) == folders.TRAIN_RUN
    assert folders.folder_kind(snap) == folders.TRAIN_SNAPSHOT


def test_train_into_an_imported_model_is_refused_and_changes_nothing(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    imported = fake_import(tmp_path / "imported")
    before = tree(imported)
    code, _, err = run(["train", "--data", str(data), "--outdir", str(imported), "--kimg", "0.008", *TINY], capsys)
    assert_refused(code, err, f"--outdir {imported}", "imported model")
    assert tree(imported) == before


def test_train_into_an_em_run_is_refused_and_changes_nothing(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    em = fake_em_run(tmp_path / "em")
    before = tree(em)
    code, _, err = run(["train", "--data", str(data), "--outdir", str(em), "--kimg", "0.008", *TINY], capsys)
    assert_refused(code, err, f"--outdir {em}", "em run")
    assert tree(em) == before


@pytest.mark.parametrize("what", ["snapshot", "samples", "other", "unreadable", "newer"])
def test_train_refuses_other_folders(train_run, tmp_path, capsys, what):
    data, run_dir = train_run
    if what == "snapshot":
        target = next(run_dir.glob("snapshot-*"))
    else:
        target = tmp_path / what
        target.mkdir()
        if what == "samples":
            (target / "000000.png").write_bytes(b"png")
        elif what == "other":
            (target / "notes.txt").write_text("mine")
        elif what == "unreadable":
            (target / "config.json").write_text("{not json")
        else:
            (target / "config.json").write_text(json.dumps({"kind": "hologram-run"}))
    before = tree(target)
    code, _, err = run(["train", "--data", str(data), "--outdir", str(target), "--kimg", "0.008", *TINY], capsys)
    assert_refused(code, err, f"--outdir {target}")
    assert tree(target) == before


def test_em_into_a_train_run_names_its_kind(train_run, tmp_path, capsys):
    data, run_dir = train_run
    before = tree(run_dir)
    code, _, err = run(["em", "--data", str(data), "--outdir", str(run_dir), "--corruption-probability", "0.5",
                        "--device", "cpu", "--no-progress"], capsys)
    assert_refused(code, err, f"--outdir {run_dir}", "train run")
    assert tree(run_dir) == before


def test_finetune_into_a_train_run_is_refused(train_run, tmp_path, capsys):
    data, run_dir = train_run
    before = tree(run_dir)
    code, _, err = run(["finetune", "--pretrained", str(tmp_path / "nowhere"), "--data", str(data),
                        "--outdir", str(run_dir), "--steps", "1", "--device", "cpu"], capsys)
    assert_refused(code, err, f"--outdir {run_dir}", "train run")
    assert tree(run_dir) == before


def test_resume_from_a_folder_of_another_kind_is_refused(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    imported = fake_import(tmp_path / "imported")
    code, _, err = run(["train", "--data", str(data), "--outdir", str(tmp_path / "new"), "--kimg", "0.008",
                        "--resume", str(imported), *TINY], capsys)
    assert_refused(code, err, f"--resume {imported}", "imported model")
    assert not (tmp_path / "new").exists()


def test_sample_from_an_em_run_without_a_finished_lap_names_it(tmp_path, capsys):
    em = fake_em_run(tmp_path / "em")
    (em / "stats.jsonl").unlink()
    code, _, err = run(["sample", "--model", str(em), "--num", "1", "--out", str(tmp_path / "s.npz")], capsys)
    assert_refused(code, err, f"--model {em}", "em run")
    assert not (tmp_path / "s.npz").exists()


def test_runs_from_before_kinds_were_recorded_still_resume(tmp_path, capsys):
    data = write_npz(tmp_path / "d.npz")
    out = tmp_path / "old"
    base = ["train", "--data", str(data), "--outdir", str(out), "--corruption-probability", "0.5", *TINY]
    code, _, err = run([*base, "--kimg", "0.016"], capsys)
    assert code == 0, err
    for cfg_path in [out / "config.json", *out.glob("snapshot-*/config.json")]:  # as an older version wrote it
        saved = json.loads(cfg_path.read_text())
        del saved["kind"]
        cfg_path.write_text(json.dumps(saved))
        done = cfg_path.parent / "COMPLETE"
        if done.is_file():
            manifest = json.loads(done.read_text())
            manifest["files"]["config.json"] = cfg_path.stat().st_size
            done.write_text(json.dumps(manifest))
    assert folders.folder_kind(out) == folders.TRAIN_RUN
    code, _, err = run([*base, "--kimg", "0.032"], capsys)
    assert code == 0, err
    assert "resuming" in err
    code, _, err = run(["sample", "--model", str(out), "--num", "1", "--steps", "2", "--out",
                        str(tmp_path / "s.npz")], capsys)
    assert code == 0, err


def test_old_folders_are_recognised_by_what_they_hold(tmp_path):
    assert folders.folder_kind(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".lock").write_text("")
    assert folders.folder_kind(tmp_path / "empty") is None
    assert folders.folder_kind(fake_import(tmp_path / "imp")) == folders.IMPORTED_MODEL
    assert folders.folder_kind(fake_import(tmp_path / "imp2", kind_recorded=True)) == folders.IMPORTED_MODEL
    assert folders.folder_kind(fake_em_run(tmp_path / "em")) == folders.EM_RUN
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "finetune_options.json").write_text("{}")
    assert folders.folder_kind(tmp_path / "ft") == folders.FINETUNE_RUN
    (tmp_path / "crashed").mkdir()  # a train run stopped before its config.json was written
    (tmp_path / "crashed" / "tensorboard").mkdir()
    assert folders.folder_kind(tmp_path / "crashed") == folders.TRAIN_RUN


@pytest.mark.skipif(not (FIXTURES / "ambient-format.pkl").is_file(), reason="reference checkpoint fixtures missing")
def test_import_records_its_kind_and_train_cannot_overwrite_it(tmp_path, capsys):
    out = tmp_path / "imported"
    code, _, err = run(["import", "--pkl", str(FIXTURES / "ambient-format.pkl"), "--out", str(out)], capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["kind"] == "imported-model"
    before = tree(out)
    data = write_npz(tmp_path / "d.npz")
    code, _, err = run(["train", "--data", str(data), "--outdir", str(out), "--kimg", "0.008", *TINY], capsys)
    assert_refused(code, err, "imported model")
    assert tree(out) == before


def test_readers_name_the_kind_of_a_folder_that_holds_no_model(train_run, tmp_path, capsys):
    data, run_dir = train_run
    em = fake_em_run(tmp_path / "em")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "000000.png").write_bytes(b"png")
    code, _, err = run(["train", "--data", str(data), "--outdir", str(tmp_path / "t"), "--init", str(em), *TINY],
                       capsys)
    assert_refused(code, err, f"--init {em}", "em run")
    assert not (tmp_path / "t").exists()
    code, _, err = run(["sample", "--model", str(pngs), "--num", "1", "--out", str(tmp_path / "s.npz")], capsys)
    assert_refused(code, err, f"--model {pngs}", "sampled images")
    code, _, err = run(["finetune", "--pretrained", str(run_dir), "--data", str(data), "--outdir",
                        str(tmp_path / "ft"), "--steps", "1", "--device", "cpu"], capsys)
    assert_refused(code, err, f"--pretrained {run_dir}", "train run")
    assert not (tmp_path / "ft").exists()
    snap = next(run_dir.glob("snapshot-*"))
    before = tree(run_dir)
    code, _, err = run(["sample", "--model", str(run_dir), "--num", "1", "--out", str(snap)], capsys)
    assert_refused(code, err, f"--out {snap}", "snapshot of a train run")
    assert tree(run_dir) == before
