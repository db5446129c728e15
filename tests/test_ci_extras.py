"""CI fails, not skips, when a package of the [test] extra is missing (conftest's hook)."""

import re
import sys
import tomllib
from pathlib import Path

import pytest

import conftest

REPO = Path(__file__).resolve().parents[1]


def test_the_table_is_the_test_extra_of_pyproject():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["test"]
    names = {re.split(r"[<>=!~ \[]", req, maxsplit=1)[0] for req in extra}
    assert set(conftest.TEST_EXTRAS.values()) == names - {"pytest", "pytest-xdist"}


def test_every_test_file_goes_through_the_hook():
    # an import the hook cannot see (``from pytest import importorskip``, a bare try/except
    # ImportError around an extra) would let CI skip again
    for path in sorted(set((REPO / "tests").glob("*.py")) - {Path(__file__).resolve()}):
        text = path.read_text()
        assert "from pytest import importorskip" not in text, path.name
        assert not re.search(r"except (ImportError|ModuleNotFoundError)", text), path.name


@pytest.mark.parametrize("ci,fails", [("true", True), ("", False)])
def test_a_missing_extra_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, fails):
    monkeypatch.setenv("CI", ci)
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib -> ImportError
    expected = pytest.fail.Exception if fails else pytest.skip.Exception
    with pytest.raises(expected, match="matplotlib"):
        pytest.importorskip("matplotlib")


def test_optional_packages_still_skip_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(pytest.skip.Exception):
        pytest.importorskip("timm")
