"""Catalogue of security and data-loss faults: weight files that would run code, overwrites of user data,
corrupted or edited model folders, and saves killed half-way. Each case asserts the exception type and a phrase
of its message, or the state left on disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import dkan
from dkan._config import DKANConfig
from dkan.nn._encoders import _weights
from dkan.train.fitted import DKANModel, build_module

GENES = ["G1", "G2", "G3", "G4"]


def _model(seed: int = 0, genes: list[str] = GENES) -> DKANModel:
    config = DKANConfig.resolve("small", d=16, feature_encoder="dummy")
    torch.manual_seed(seed)
    module = build_module(config, n_genes=len(genes), gene_dim=8, feature_dim=16, pretrained=False)
    emb = np.random.default_rng(seed).normal(size=(len(genes), 8)).astype(np.float32)
    return DKANModel(module, config, genes, emb, {"features": {"encoder": "dummy", "dim": 16}})


@pytest.fixture(scope="module")
def model() -> DKANModel:
    return _model()


# ------------------------------------------------------------------------------------ weight files never unpickle
class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: the pickle equivalent of arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    from torchvision.models import resnet18

    sd = {f"model.resnet.{k}": v for k, v in resnet18(weights=None).state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": _Payload(marker)}, path)
    return path


@pytest.mark.parametrize("route", ["checkpoint_path", "env", "cache"])
def test_weight_file_with_code_is_refused_on_every_route(tmp_path, monkeypatch, route):
    marker = tmp_path / "code-ran"
    folder = tmp_path / "w"
    folder.mkdir()
    ckpt = _evil_checkpoint(folder / "tenpercent_resnet18.ckpt", marker)
    kwargs = {}
    if route == "checkpoint_path":
        kwargs["checkpoint_path"] = ckpt
    elif route == "env":
        monkeypatch.setenv("DKAN_RESNET18_CIGA", str(ckpt))
    else:
        monkeypatch.setenv("DKAN_CACHE_DIR", str(folder))
        monkeypatch.delenv("DKAN_RESNET18_CIGA", raising=False)
    with pytest.raises(ValueError, match="never unpickles"):
        dkan.nn.create_image_encoder("resnet18_ciga", **kwargs)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04truncated zip"])
def test_unreadable_weight_file_is_a_value_error(tmp_path, content):
    bad = tmp_path / "w.pth"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="plain tensor file"):
        _weights.read_state_dict(bad)


def test_broken_safetensors_is_a_value_error(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="Cannot read safetensors"):
        _weights.read_state_dict(bad)


def test_trusted_checkpoint_converts_and_then_loads(tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = _evil_checkpoint(tmp_path / "t.ckpt", marker)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        dkan.nn.convert_checkpoint(ckpt, tmp_path / "t.safetensors")
    out = dkan.nn.convert_checkpoint(ckpt, tmp_path / "t.safetensors", trust_pickle=True)
    enc = dkan.nn.create_image_encoder("resnet18_ciga", checkpoint_path=out)
    assert enc.num_features == 512


def _fake_download(payload: bytes):
    def download(url: str, dst: str, progress: bool = True) -> None:
        Path(dst).write_bytes(payload)

    return download


def test_download_without_known_digest_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(b"weights"))
    with pytest.raises(ValueError, match="without a known SHA-256"):
        _weights.download_verified("https://example.org/w.pth", tmp_path / "w.pth", sha256=None, what="X")
    assert not (tmp_path / "w.pth").exists()


def test_download_with_wrong_digest_is_deleted(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(b"tampered"))
    good = hashlib.sha256(b"weights").hexdigest()
    with pytest.raises(ValueError, match="expected"):
        _weights.download_verified("https://example.org/w.pth", tmp_path / "w.pth", sha256=good, what="X")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(b"weights"))
    got = _weights.download_verified("https://example.org/w.pth", tmp_path / "w.pth", sha256=good, what="X")
    assert got.read_bytes() == b"weights"


# ------------------------------------------------------------------------------------- overwrite only dkan models
def _user_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    return folder


def test_save_overwrite_refuses_a_folder_that_is_not_a_model(tmp_path, model):
    folder = _user_folder(tmp_path)
    with pytest.raises(ValueError, match="not a dkan model folder"):
        model.save(folder, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_save_overwrite_refuses_a_file(tmp_path, model):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    with pytest.raises(ValueError, match="is a file"):
        model.save(f, overwrite=True)
    assert f.read_text() == "keep"


def test_save_without_overwrite_refuses_an_existing_path(tmp_path, model):
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "m")


def test_overwrite_replaces_a_model_and_keeps_foreign_files(tmp_path, model):
    path = model.save(tmp_path / "m")
    (path / "README.txt").write_text("my notes")
    other = _model(seed=1, genes=["A", "B"])
    other.save(path, overwrite=True)
    loaded = DKANModel.load(path)
    assert loaded.genes == ["A", "B"]
    assert (path / "README.txt").read_text() == "my notes"
    assert len(list(path.glob("*.safetensors"))) == 2  # the old tensor files are gone


def test_cli_train_overwrite_refuses_a_non_model_folder_before_training(tmp_path, capsys):
    from dkan.cli import main

    folder = _user_folder(tmp_path)
    code = main(["train", str(tmp_path / "missing.zarr"), "--out", str(folder), "--overwrite"])
    assert code != 0
    assert "not a dkan model folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_cli_predict_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, capsys, model):
    from dkan.cli import main

    folder = _user_folder(tmp_path)
    mdir = model.save(tmp_path / "m")
    store = tmp_path / "in.zarr"
    store.mkdir()
    code = main(["predict", str(store), "--model", str(mdir), "--out", str(folder), "--overwrite"])
    assert code != 0
    assert "not a zarr store" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def test_saved_files_follow_the_umask(tmp_path, model):
    old = os.umask(0o022)
    try:
        path = model.save(tmp_path / "m")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {0o644}


# ------------------------------------------------------------------------------------ integrity of saved models
def _manifest(path: Path) -> dict:
    return json.loads((path / "dkan.json").read_text())


def _flip_byte(path: Path) -> None:
    f = next(path.glob("model.*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def _swap_genes(path: Path) -> None:
    m = _manifest(path)
    m["genes"][0], m["genes"][1] = m["genes"][1], m["genes"][0]
    (path / "dkan.json").write_text(json.dumps(m))


def _truncate_json(path: Path) -> None:
    text = (path / "dkan.json").read_text()
    (path / "dkan.json").write_text(text[: len(text) // 2])


def _drop_weights(path: Path) -> None:
    next(path.glob("model.*.safetensors")).unlink()


def _rewrite_weights(path: Path, edit) -> None:
    """Change the weights file and record its new checksum, as a consistent but wrong save would."""
    from safetensors.torch import load_file, save_file

    from dkan.train import _store

    f = next(path.glob("model.*.safetensors"))
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f))
    m = _manifest(path)
    m["sha256"]["weights"] = _store.file_sha256(f)
    (path / "dkan.json").write_text(json.dumps(m))


def _wrong_shape(path: Path) -> None:
    def edit(sd):
        k = sorted(sd)[0]
        sd[k] = torch.zeros(*sd[k].shape, 2)

    _rewrite_weights(path, edit)


def _missing_tensor(path: Path) -> None:
    _rewrite_weights(path, lambda sd: sd.pop(sorted(sd)[0]))


def _no_checksums(path: Path) -> None:
    m = _manifest(path)
    del m["sha256"]
    (path / "dkan.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("damage", "exc", "phrase"),
    [
        (_flip_byte, ValueError, "does not match the checksum"),
        (_swap_genes, ValueError, "edited after saving"),
        (_truncate_json, ValueError, "is not valid JSON"),
        (_drop_weights, FileNotFoundError, "is missing"),
        (_wrong_shape, ValueError, "shapes do not match"),
        (_missing_tensor, ValueError, "lacks tensor"),
        (_no_checksums, ValueError, "no `sha256` field"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_damaged_model_is_refused_naming_the_file(tmp_path, model, damage, exc, phrase):
    path = model.save(tmp_path / "m")
    damage(path)
    with pytest.raises(exc, match=phrase) as info:
        DKANModel.load(path)
    assert str(path) in str(info.value)


def test_cli_reports_a_corrupt_model_in_one_line(tmp_path, model, capsys):
    from dkan.cli import main

    path = model.save(tmp_path / "m")
    _flip_byte(path)
    store = tmp_path / "in.zarr"
    store.mkdir()
    code = main(["predict", str(store), "--model", str(path), "--out", str(tmp_path / "out.zarr")])
    err = capsys.readouterr().err
    assert code != 0 and "checksum" in err and "Traceback" not in err


def test_load_names_a_bad_device(tmp_path, model):
    path = model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="is not a torch device"):
        DKANModel.load(path, device="foo")


def test_round_trip_is_exact(tmp_path, model):
    loaded = DKANModel.load(model.save(tmp_path / "m"))
    assert loaded.genes == model.genes
    np.testing.assert_array_equal(loaded.gene_embeddings, model.gene_embeddings)
    for (k, a), (_, b) in zip(model.module.state_dict().items(), loaded.module.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------------------------------ killed saves
_SAVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_catalogue_security import _model
    a, b = _model(0, ["A1", "A2"]), _model(1, ["B1", "B2", "B3"])
    path = {path!r}
    a.save(path, overwrite=True)
    print("ready", flush=True)
    i = 0
    while True:
        (b if i % 2 == 0 else a).save(path, overwrite=True)
        i += 1
    """
)


def test_save_killed_at_random_points_leaves_old_or_new_model(tmp_path):
    path = tmp_path / "m"
    script = _SAVER.format(tests=str(Path(__file__).parent), path=str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        rng = np.random.default_rng(0)
        for _ in range(12):
            time.sleep(float(rng.uniform(0.0, 0.05)))
            proc.send_signal(signal.SIGSTOP)  # freeze mid-save, check what a reader would see now
            genes = DKANModel.load(path).genes
            assert genes in (["A1", "A2"], ["B1", "B2", "B3"])
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    assert DKANModel.load(path).genes in (["A1", "A2"], ["B1", "B2", "B3"])
    _model(2, ["C1", "C2"]).save(path, overwrite=True)  # the next save cleans up what the killed one left
    assert sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors").__len__() == 2
    assert not [p for p in path.iterdir() if ".tmp-" in p.name]
    assert DKANModel.load(path).genes == ["C1", "C2"]


def test_killed_first_save_leaves_nothing_and_is_cleaned_up(tmp_path, model):
    path = tmp_path / "m"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.dkan-tmp-{dead.pid}-0123abcd"
    stale.mkdir()
    (stale / "model.0123abcd.safetensors").write_bytes(b"half")
    assert not path.exists()
    model.save(path)
    assert not stale.exists()
    assert DKANModel.load(path).genes == GENES


_CHECKPOINTER = textwrap.dedent(
    """
    from pathlib import Path
    from types import SimpleNamespace
    import torch
    from dkan.train._checkpoint import save_checkpoint
    module = torch.nn.Linear(256, 256)
    opt = torch.optim.Adam(module.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    result = SimpleNamespace(history=[], best_state=None, best_epoch=-1, best_score=float("nan"))
    path = Path({path!r})
    save_checkpoint(path, module, opt, sched, result, 0, 0, {{"run": 1}})
    print("ready", flush=True)
    epoch = 1
    while True:
        save_checkpoint(path, module, opt, sched, result, epoch, 0, {{"run": 1}})
        epoch += 1
    """
)


def test_checkpoint_write_killed_at_random_points_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHECKPOINTER.format(path=str(path))], stdout=subprocess.PIPE, env=env
    )
    epochs = []
    try:
        assert proc.stdout.readline().strip() == b"ready"
        rng = np.random.default_rng(1)
        for _ in range(12):
            time.sleep(float(rng.uniform(0.0, 0.05)))
            proc.send_signal(signal.SIGSTOP)  # what a resume would read if the writer died right now
            epochs.append(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["epoch"] >= max(epochs) and epochs == sorted(epochs)
    assert state["module"]["weight"].shape == (256, 256)
