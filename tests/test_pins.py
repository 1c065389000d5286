"""tools/check_pins.py: the check `make test` runs so that a passing suite is known to have used the pins."""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_pins", ROOT / "tools" / "check_pins.py")
check_pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_pins)


def test_mismatch_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("# comment\nFoo_Bar==1.0\n\nbaz==2.0  # trailing\n-c other.txt\n")
    pins = check_pins.read_pins(f)
    assert pins == {"foo-bar": "1.0", "baz": "2.0"}
    assert check_pins.mismatches(pins, {"foo-bar": "1.0", "baz": "2.0"}) == []
    assert check_pins.mismatches(pins, {"foo-bar": "1.1"}) == [
        "baz: pinned 2.0, installed nothing", "foo-bar: pinned 1.0, installed 1.1"]
    assert check_pins.main([str(f)]) == 1  # foo-bar is not installed here


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("ok==1\nfoo>=2\n")
    with pytest.raises(ValueError, match=r"c.txt:2: expected 'name==version'"):
        check_pins.read_pins(f)
    assert check_pins.main([str(f)]) == 2


def test_constraints_pin_the_libraries_we_depend_on_and_not_torch() -> None:
    pins = check_pins.read_pins(ROOT / "constraints.txt")
    for name in ("transformers", "accelerate", "datasets", "safetensors", "tokenizers", "trl", "peft"):
        assert name in pins, name
    assert "torch" not in pins  # torch comes from TORCH_SPEC, overridable


@pytest.mark.skipif(not os.environ.get("EXOALIGN_CONSTRAINTS"), reason="make test sets EXOALIGN_CONSTRAINTS")
def test_installed_versions_equal_the_pins() -> None:
    """Under `make test` the environment is exactly the pinned one (the Makefile also checks before pytest)."""
    pins = check_pins.read_pins(ROOT / os.environ["EXOALIGN_CONSTRAINTS"])
    assert check_pins.mismatches(pins) == []
    assert metadata.version("transformers") == pins["transformers"]


def test_a_vendored_copy_on_sys_path_is_not_the_installed_version(tmp_path, monkeypatch) -> None:
    """setuptools puts its _vendor directory (with an older packaging-*.dist-info) on sys.path when imported:
    the check reads the version an import would load, the first on sys.path, not the last one found."""
    real = metadata.version("packaging")
    vendored = tmp_path / "packaging-0.0.1.dist-info"
    vendored.mkdir()
    (vendored / "METADATA").write_text("Metadata-Version: 2.1\nName: packaging\nVersion: 0.0.1\n")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])  # after site-packages, as setuptools appends it
    assert check_pins.mismatches({"packaging": real}) == []
