import importlib
import subprocess
import sys

import pytest

import dkan


def test_import_is_light():
    code = (
        "import sys, dkan, dkan.tl, dkan.pp, dkan.pl, dkan.io, dkan.datasets; "
        "print(sorted({'torch', 'timm', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("sub", ["datasets", "io", "pp", "tl", "pl", "nn", "train"])
def test_every_public_name_resolves(sub):
    mod = importlib.import_module(f"dkan.{sub}")
    for name in mod.__all__:
        assert getattr(mod, name) is not None, f"dkan.{sub}.{name}"


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        dkan.does_not_exist  # noqa: B018
