"""Catalogue of bad inputs that must give a named error (issue 12, "raw errors where a named one belongs").

Each case asserts the exception type and a phrase of its message; the CLI cases assert one line on stderr
(``dkan: error: ...``), a non-zero exit and no traceback. Everything runs on tiny synthetic data, without
training and without the network.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _stfiles import write_section

import dkan
from dkan.cli import error_line, main

KEY = "sk-SECRET0123456789abcdef"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def small():
    """One tiny toy slide (16 spots, 10 genes)."""
    return dkan.datasets.toy(seed=0, n_samples=1, grid_size=4, n_genes=10)


@pytest.fixture
def sdata(small):
    from dkan.datasets import copy_sdata

    return copy_sdata(small)


def _dup_genes(sd):
    adata = sd.tables["table"]
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names
    return sd


def _fake_model(genes):
    """A DKANModel shell (no network weights): enough for the checks that run before any forward pass."""
    import torch

    from dkan._config import DKANConfig
    from dkan.train.fitted import DKANModel

    return DKANModel(torch.nn.Identity(), DKANConfig(), list(genes), np.zeros((len(genes), 4), np.float32), {})


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    return write_section(tmp_path_factory.mktemp("st"), gz=False)


# ------------------------------------------------------------------------------------------------ python API
def _predict_bad_model_type(sd, tmp):
    dkan.tl.predict(sd, 42)


def _predict_missing_dir(sd, tmp):
    dkan.tl.predict(sd, str(tmp / "model_dir"))


def _predict_dup_genes(sd, tmp):
    dkan.tl.predict(_dup_genes(sd), _fake_model(sd.tables["table"].var_names[2:]))


def _predict_batch(value):
    def case(sd, tmp):
        dkan.tl.predict(sd, _fake_model(sd.tables["table"].var_names), batch_size=value)

    return case


def _predict_device(sd, tmp):
    dkan.tl.predict(sd, _fake_model(sd.tables["table"].var_names), device="foo")


def _train_dup_genes(sd, tmp):
    dkan.tl.train(_dup_genes(sd), device="cpu", progress=False)


def _train_device(sd, tmp):
    dkan.tl.train(sd, device="foo", progress=False)


def _embed_batch(value):
    def case(sd, tmp):
        dkan.tl.embed_genes(sd, batch_size=value, progress=False)

    return case


def _features_device(sd, tmp):
    dkan.tl.tile(sd, patch_size=16)
    dkan.tl.extract_features(sd, encoder="dummy", device="foo", progress=False)


def _select(**kw):
    def case(sd, tmp):
        dkan.pp.select_genes(sd, **kw)

    return case


def _tile(**kw):
    def case(sd, tmp):
        dkan.tl.tile(sd, **kw)

    return case


API_CASES = [
    ("predict-model-int", _predict_bad_model_type, TypeError, "dkan.DKANModel"),
    ("predict-model-missing-dir", _predict_missing_dir, FileNotFoundError, "model_dir"),
    ("predict-duplicated-genes", _predict_dup_genes, ValueError, "var_names_make_unique"),
    ("predict-batch-size-0", _predict_batch(0), ValueError, "batch_size=0"),
    ("predict-batch-size-negative", _predict_batch(-5), ValueError, "batch_size=-5"),
    ("predict-batch-size-str", _predict_batch("8"), TypeError, "batch_size"),
    ("predict-device-foo", _predict_device, ValueError, "device='foo'"),
    ("train-duplicated-genes", _train_dup_genes, ValueError, "var_names_make_unique"),
    ("train-device-foo", _train_device, ValueError, "device='foo'"),
    ("features-device-foo", _features_device, ValueError, "device='foo'"),
    ("embed-genes-batch-size-0", _embed_batch(0), ValueError, "batch_size=0"),
    ("embed-genes-batch-size-float", _embed_batch(2.5), TypeError, "batch_size"),
    ("select-genes-n-genes-str", _select(n_genes="5"), TypeError, "n_genes"),
    ("select-genes-n-genes-float", _select(n_genes=2.5), TypeError, "n_genes"),
    ("select-genes-n-genes-0", _select(n_genes=0), ValueError, "n_genes=0"),
    ("select-genes-min-fraction-str", _select(n_genes=5, min_fraction="0.1"), TypeError, "min_fraction"),
    ("tile-region-grid-even", _tile(patch_size=16, region_grid=4), ValueError, "must be odd"),
    ("tile-region-grid-str", _tile(patch_size=16, region_grid="5"), TypeError, "region_grid"),
    ("tile-patch-size-float", _tile(patch_size=16.5), TypeError, "patch_size"),
]


@pytest.mark.parametrize(("case", "exc", "phrase"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_error(case, exc, phrase, sdata, tmp_path):
    with pytest.raises(exc) as info:
        case(sdata, tmp_path)
    assert phrase in str(info.value)


def test_predict_loads_a_model_path(sdata, tmp_path, monkeypatch):
    """A path given as ``model`` goes to DKANModel.load (and nothing else does)."""
    from dkan.train.fitted import DKANModel

    seen = []

    def fake_load(path, **kw):
        seen.append(path)
        raise LookupError("loaded")

    monkeypatch.setattr(DKANModel, "load", staticmethod(fake_load))
    for path in (str(tmp_path / "m"), tmp_path / "m"):
        with pytest.raises(LookupError, match="loaded"):
            dkan.tl.predict(sdata, path)
    assert seen == [str(tmp_path / "m"), tmp_path / "m"]


@pytest.mark.parametrize(
    ("device", "exc", "phrase"),
    [
        ("foo", ValueError, "is not a torch device"),
        ("cuda:x", ValueError, "is not a torch device"),
        (1.5, TypeError, "device name"),
        (True, TypeError, "device name"),
    ],
)
def test_resolve_device(device, exc, phrase):
    from dkan._utils import resolve_device

    with pytest.raises(exc, match=phrase):
        resolve_device(device)


def test_resolve_device_cuda_missing(monkeypatch):
    import torch

    from dkan._utils import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device(None).type == "cpu"
    assert resolve_device("cpu").type == "cpu"


def test_text_encoder_device_is_checked():
    import torch

    from dkan.nn.text_encoders import TextEncoder

    with pytest.raises(ValueError, match="device='foo'"):
        TextEncoder(torch.nn.Identity(), object(), name="x", pooling="mean", device="foo")


# ------------------------------------------------------------------------------------------------ readers
def _st(section, tmp, counts=None, spots=None, image=None):
    return dkan.io.read_st(
        counts or section["counts"], spots or section["spots"], image or section["image"], sample_id="S1"
    )


def _write(tmp: Path, name: str, data: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


READ_CASES = [
    ("image-not-an-image", {"image": ("bad.jpg", "not an image")}, "cannot be decoded"),
    ("image-empty", {"image": ("empty.png", b"")}, "cannot be decoded"),
    ("counts-empty", {"counts": ("empty.tsv", "")}, "is empty"),
    ("counts-header-only", {"counts": ("header.tsv", "\tG1\tG2\n")}, "0 spot row(s)"),
    ("counts-no-genes", {"counts": ("nogenes.tsv", "spot\n1x1\n2x1\n")}, "0 gene column(s)"),
    ("spots-empty", {"spots": ("empty_spots.tsv", "")}, "`spots` file"),
]


@pytest.mark.parametrize(("files", "phrase"), [c[1:] for c in READ_CASES], ids=[c[0] for c in READ_CASES])
def test_read_st_error(files, phrase, section, tmp_path):
    paths = {k: _write(tmp_path, name, data) for k, (name, data) in files.items()}
    with pytest.raises(ValueError) as info:
        _st(section, tmp_path, **paths)
    assert phrase in str(info.value)


def test_read_st_truncated_image_fails_when_decoded(section, tmp_path):
    """A truncated image whose header reads is refused with a named error when its pixels are decoded."""
    data = section["image"].read_bytes()
    bad = _write(tmp_path, "trunc.png", data[: len(data) // 2])
    sd = _st(section, tmp_path, image=bad)
    with pytest.raises(ValueError, match="cannot be decoded"):
        sd.images["S1_image"]["scale0"]["image"].data.compute()


# ------------------------------------------------------------------------------------------------ online sources
def _ncbi(**kw):
    from dkan._genetext.ncbi import NCBIClient

    return NCBIClient(cache_dir="/nonexistent-dkan-cache", **kw)


def _llm(**kw):
    from dkan._genetext.llm import LLMClient

    return LLMClient(base_url="http://127.0.0.1:9/v1", cache_dir="/nonexistent-dkan-cache", **kw)


@pytest.mark.parametrize("client", [_ncbi, _llm], ids=["ncbi", "llm"])
@pytest.mark.parametrize("timeout", [None, -1, 0, float("inf"), "30", True])
def test_online_timeout_refused(client, timeout):
    with pytest.raises(ValueError, match="`timeout` must be a finite number"):
        client(timeout=timeout)


def _http_error(body: str):
    def urlopen(req, timeout=None):
        raise urllib.error.HTTPError(req.full_url, 401, "Unauthorized", {}, io.BytesIO(body.encode()))

    return urlopen


ECHO = f'{{"error": "invalid key {KEY}", "api_key={KEY}", "Authorization: Bearer {KEY}"}}'


class _Refusing:
    """A chat client whose requests fail the way the `openai` client reports an HTTP 401 (the body quoted)."""

    def __init__(self) -> None:
        self.chat = self
        self.completions = self

    def create(self, **kw):
        raise RuntimeError(f"Error code: HTTP 401 - {ECHO}")


@pytest.mark.parametrize(
    "call",
    [
        lambda: _ncbi(api_key=KEY, max_retries=0).search("ERBB2"),
        lambda: _llm(api_key=KEY, max_retries=0, client=_Refusing()).condense("ERBB2"),
    ],
    ids=["ncbi", "llm"],
)
def test_server_error_body_is_redacted(call, monkeypatch):
    from dkan._genetext.ncbi import ServiceError

    monkeypatch.setattr(urllib.request, "urlopen", _http_error(ECHO))
    with pytest.raises(ServiceError, match="HTTP 401") as info:
        call()
    assert KEY not in str(info.value)
    assert KEY[:12] not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("bad request: api_key=abcdef123456&db=gene", "db=gene"),
        ('{"api_key": "abcdef123456", "x": 1}', '"x": 1'),
        ("Authorization: Bearer abcdef123456 rejected", "rejected"),
        ("API-KEY:abcdef123456", "API-KEY:"),
    ],
)
def test_redact_patterns(text, kept):
    from dkan._genetext.ncbi import redact

    out = redact(text)
    assert "abcdef123456" not in out
    assert kept in out


# ------------------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def store(tmp_path_factory, small):
    path = tmp_path_factory.mktemp("cli") / "toy.zarr"
    small.write(path)
    return path


def _corrupt_model(tmp: Path) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    (folder / "dkan.json").write_text('{"format": "dkan-model", "genes": [')  # truncated JSON
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    return folder


def _cli_cases(tmp: Path, store: Path) -> dict[str, list[str]]:
    not_zarr = tmp / "plain"
    not_zarr.mkdir()
    return {
        "train-missing-store": ["train", str(tmp / "missing.zarr"), "--out", str(tmp / "m")],
        "train-store-not-zarr": ["train", str(not_zarr), "--out", str(tmp / "m")],
        "train-bad-device": ["train", str(store), "--out", str(tmp / "m"), "--device", "foo"],
        "train-config-missing-json": ["train", str(store), "--out", str(tmp / "m"), "--config", "nope.json"],
        "predict-missing-model": ["predict", str(store), "--model", str(tmp / "nomodel"), "--out", str(tmp / "o")],
        "predict-corrupt-model": ["predict", str(store), "--model", str(_corrupt_model(tmp)), "--out", str(tmp / "o")],
    }


CLI_PHRASES = {
    "train-missing-store": "does not exist",
    "train-store-not-zarr": "cannot be read as a SpatialData zarr store",
    "train-bad-device": "device='foo'",
    "train-config-missing-json": "does not exist",
    "predict-missing-model": "nomodel",
    "predict-corrupt-model": "could not be loaded",
}


@pytest.mark.parametrize("name", list(CLI_PHRASES))
def test_cli_error_is_one_line(name, store, tmp_path, capsys):
    argv = _cli_cases(tmp_path, store)[name]
    assert main([*argv, "-q", "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dkan: error: ")
    assert "Traceback" not in err
    assert CLI_PHRASES[name] in lines[0]


def test_cli_debug_shows_the_error(store, tmp_path):
    argv = _cli_cases(tmp_path, store)["train-bad-device"]
    with pytest.raises(ValueError, match="device='foo'"):
        main([*argv, "-q", "--debug"])


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (KeyError("`table_key='x'` not found"), "`table_key='x'` not found"),
        (ValueError("first line\n  second line"), "first line second line"),
        (OSError(), "OSError"),
    ],
)
def test_error_line(err, line):
    assert error_line(err) == line


def test_corrupt_model_message_names_the_folder(tmp_path, capsys):
    folder = _corrupt_model(tmp_path)
    assert main(["predict", str(tmp_path / "in.zarr"), "--model", str(folder), "--out", str(tmp_path / "o")]) == 1
    assert str(folder) in capsys.readouterr().err


def test_config_json_is_one_line(store, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps([1, 2]))
    assert main(["train", str(store), "--out", str(tmp_path / "m"), "--config", str(cfg), "-q"]) == 1
    assert "JSON object" in capsys.readouterr().err
