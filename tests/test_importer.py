"""Importing the paper's checkpoints (ambient.store.safe_pickle, ambient.store.importer, `ambient import`).

The fixtures were made by the reference code (see shared/fixtures/reference-checkpoints/README.md);
probe.npz holds the reference network's own output, which an imported model must reproduce.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from ambient.cli import main
from ambient.errors import AmbientInputError
from ambient.store import safe_pickle
from ambient.store.importer import import_checkpoint, read_checkpoint
from ambient.store.models import load_model

FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "reference-checkpoints"
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "probe.npz").is_file(),
                                    reason=f"reference checkpoint fixtures not found at {FIXTURES}")


@pytest.fixture
def no_payload_here(tmp_path, monkeypatch):
    """Where the payload fixture's embedded source would create PWNED if it ever ran."""
    monkeypatch.setenv("AMBIENT_PWNED_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / "PWNED").exists(), "code embedded in the pickle was executed"


def _probe():
    p = np.load(FIXTURES / "probe.npz")
    return (torch.from_numpy(p["x"]), torch.from_numpy(p["sigma"]), torch.from_numpy(p["D"]))


@needs_fixtures
@pytest.mark.parametrize("name,options", [("ambient-format.pkl", True), ("ambient-format.pkl", False),
                                          ("edm-format.pkl", False), ("edm-format-payload.pkl", False)])
def test_imported_model_reproduces_the_reference_output(name, options, no_payload_here):
    out = import_checkpoint(FIXTURES / name, no_payload_here / "model",
                            FIXTURES / "training_options.json" if options else None)
    loaded = load_model(out)
    assert not loaded.denoiser.training
    x, sigma, expected = _probe()
    with torch.no_grad():
        d = loaded.denoiser(x[:, :3], sigma, x[:, 3:])
    torch.testing.assert_close(d, expected[:, :3], rtol=1e-5, atol=1e-5)
    model = loaded.config["model"]
    assert (model["preconditioning"], model["img_channels"], model["resolution"]) == ("reference", 3, 16)
    song = model["songunet"]
    assert (song["gated"], song["augment_dim"], song["channel_mult"]) == (True, 9, [1, 2])
    assert song["attn_resolutions"] == [8]
    assert sum(p.numel() for p in loaded.denoiser.parameters()) == 356_182  # the README's count


@needs_fixtures
def test_both_formats_hold_the_same_weights(no_payload_here):
    a = read_checkpoint(FIXTURES / "ambient-format.pkl")
    b = read_checkpoint(FIXTURES / "edm-format-payload.pkl")
    assert (a["format"], b["format"]) == ("ambient", "edm")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert b["init_kwargs"]["model_channels"] == 16 and b["sigma_data"] == 0.5


@needs_fixtures
def test_cli_import_then_sample(no_payload_here):
    out = no_payload_here / "m"
    with pytest.raises(SystemExit) as e:
        main(["import", "--pkl", str(FIXTURES / "edm-format-payload.pkl"), "--out", str(out)])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(out), "--num", "2", "--steps", "2", "--out", str(no_payload_here / "s.npz")])
    assert e.value.code == 0
    images = np.load(no_payload_here / "s.npz")["images"]
    assert images.shape == (2, 16, 16, 3) and images.std() > 0


@needs_fixtures
def test_options_that_contradict_the_weights_are_refused(tmp_path):
    opts = json.loads((FIXTURES / "training_options.json").read_text())
    opts["network_kwargs"]["channel_mult"] = [1, 2, 2]
    bad = tmp_path / "opts.json"
    bad.write_text(json.dumps(opts))
    with pytest.raises(AmbientInputError, match="channel_mult"):
        import_checkpoint(FIXTURES / "ambient-format.pkl", tmp_path / "m", bad)
    assert not (tmp_path / "m").exists()


def test_weights_that_do_not_fit_the_inferred_network_give_one_line():
    from ambient.store.importer import _load_exact

    net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    sd = {"0.weight": torch.zeros(3, 2, dtype=torch.float16), "0.bias": torch.ones(3, dtype=torch.float16)}
    _load_exact(net, sd, "x.pkl")  # half-precision weights load into the float32 network
    assert net[0].bias.dtype == torch.float32 and net[0].bias.sum() == 3
    for bad, what in (({"0.weight": sd["0.weight"]}, "missing keys 0.bias"),
                      ({**sd, "0.extra": sd["0.bias"]}, "unexpected keys 0.extra"),
                      ({**sd, "0.bias": torch.ones(4)}, r"shape mismatch for 0.bias \(checkpoint \(4,\)")):
        with pytest.raises(AmbientInputError, match=what) as err:
            _load_exact(net, bad, "x.pkl")
        assert "\n" not in str(err.value) and "--pkl x.pkl" in str(err.value)
        assert str(err.value).endswith("give its --training-options)")


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _legacy_storage_with(inner_evil: bytes) -> bytes:
    """A legacy storage payload whose storage-descriptor pickle calls a forbidden global."""
    head = b"".join(pickle.dumps(v, protocol=2) for v in
                    (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}))
    return head + inner_evil


HOSTILE = {
    "os.system": (lambda: pickle.dumps({"ema": _Reduce(os.system, ("touch PWNED",))}), "posix.system"),
    "eval": (lambda: pickle.dumps(_Reduce(eval, ("__import__('os').system('touch PWNED')",))), "builtins.eval"),
    "getattr": (lambda: b"cbuiltins\ngetattr\n(S'os'\nS'system'\ntR.", "builtins.getattr"),
    "inside a storage": (lambda: pickle.dumps(_Reduce(torch.storage._load_from_bytes, (
        _legacy_storage_with(pickle.dumps(_Reduce(os.system, ("touch PWNED",)), protocol=2)),))), "posix.system"),
    "protocol 0 global": (lambda: b"csubprocess\ncall\n(S'touch PWNED'\ntR.", "subprocess.call"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickles_are_refused_naming_the_global(case, no_payload_here):
    make, name = HOSTILE[case]
    evil = no_payload_here / "evil.pkl"
    evil.write_bytes(make())
    with pytest.raises(safe_pickle.RefusedPickle, match=f"refusing global '{name}'"):
        safe_pickle.load(evil)


def test_cli_refuses_hostile_pickle_with_exit_2(no_payload_here, capsys):
    evil = no_payload_here / "evil.pkl"
    evil.write_bytes(HOSTILE["os.system"][0]())
    with pytest.raises(SystemExit) as e:
        main(["import", "--pkl", str(evil), "--out", str(no_payload_here / "m")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "posix.system" in err
    assert not (no_payload_here / "m").exists()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_tensor_past_its_storage_is_refused(tmp_path):
    storage = torch.arange(4.0).storage()
    ok = pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, (storage, 1, (3,), (1,), False, OrderedDict())))
    (tmp_path / "ok.pkl").write_bytes(ok)
    torch.testing.assert_close(safe_pickle.load(tmp_path / "ok.pkl"), torch.tensor([1.0, 2.0, 3.0]))
    bad = pickle.dumps(_Reduce(torch._utils._rebuild_tensor_v2, (storage, 2, (3,), (1,), False, OrderedDict())))
    (tmp_path / "bad.pkl").write_bytes(bad)
    with pytest.raises(safe_pickle.RefusedPickle, match="past its storage"):
        safe_pickle.load(tmp_path / "bad.pkl")


@needs_fixtures
def test_sampling_mask_law_from_flags(no_payload_here):
    from ambient.data.corruption import Corruption

    plain = load_model(import_checkpoint(FIXTURES / "ambient-format.pkl", no_payload_here / "a"))
    assert not plain.sampling.uses_masks  # the fixture's dataset_kwargs record no corruption
    law = {"corruption_probability": 0.9, "delta_probability": 0.1, "mask_full_rgb": True, "corruption_pattern": None}
    loaded = load_model(import_checkpoint(FIXTURES / "ambient-format.pkl", no_payload_here / "b", corruption=law))
    assert loaded.sampling.corruption == Corruption("dust", 0.9, 0.1, True)
    with pytest.raises(AmbientInputError, match="already exists"):
        import_checkpoint(FIXTURES / "ambient-format.pkl", no_payload_here / "b")


def test_conditional_reference_checkpoint(tmp_path, capsys):
    """A class-conditional network in the reference's format (pickled by torch itself) imports with its
    label input; its denoiser takes class_labels as EDMPrecond does, and sampling needs a class."""
    from ambient.nets.ddpmpp import ReferenceDenoiser
    from ambient.nets.songunet import SongUNet, SongUNetConfig

    torch.manual_seed(0)
    net = SongUNet(SongUNetConfig(img_resolution=8, in_channels=2, out_channels=2, label_dim=4, model_channels=16,
                                  channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sd = OrderedDict(("_orig_mod.model." + k, v) for k, v in net.state_dict().items())
    pkl = tmp_path / "cond.pkl"
    pkl.write_bytes(pickle.dumps({"ema": sd, "loss_fn": None, "augment_pipe": None,
                                  "dataset_kwargs": {"resolution": 8, "use_labels": True,
                                                     "corruption_probability": 0.5, "delta_probability": 0.1}}))
    loaded = load_model(import_checkpoint(pkl, tmp_path / "m"))
    assert (loaded.model.label_dim, loaded.model.img_channels, loaded.sampling.corruption.p) == (4, 1, 0.5)
    x, mask = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    labels = torch.eye(4)[[0, 2, 3]]
    with torch.no_grad():
        expected = ReferenceDenoiser(net.eval(), 1)(x, 0.7, mask, class_labels=labels)
        torch.testing.assert_close(loaded.denoiser(x, 0.7, mask, class_labels=labels), expected)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(tmp_path / "m"), "--num", "1", "--out", str(tmp_path / "s.npz")])
    assert e.value.code == 2 and "class-conditional (4 classes)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["sample", "--model", str(tmp_path / "m"), "--num", "2", "--class", "3", "--steps", "2",
              "--out", str(tmp_path / "s.npz")])
    assert e.value.code == 0 and np.load(tmp_path / "s.npz")["images"].shape == (2, 8, 8, 1)
