"""Shared fixtures: the bundled example models, written once per test session.

In CI (``CI`` set to true, as CI services do, and ``.ci/run``), a missing
package of the ``[test]`` extra fails the run instead of skipping its tests:
CI installs those extras, so a skip there would hide a broken install or a
broken import. torchvision and timm stay optional (the ``zoo`` marker).
"""

import os

import pytest
import torch

from examples.models import save_examples

# import name -> the [test] extra's requirement that provides it (test_ci_extras checks the
# table against pyproject.toml)
TEST_EXTRAS = {"transformers": "transformers", "safetensors": "safetensors",
               "onnxruntime": "onnxruntime", "sklearn": "scikit-learn",
               "matplotlib": "matplotlib"}
_importorskip = pytest.importorskip


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def strict_importorskip(modname: str, *args, **kwargs):
    """``pytest.importorskip``, except that in CI a [test] extra that is missing fails."""
    __tracebackhide__ = True   # skips and failures point at the test file's line, not here
    try:
        return _importorskip(modname, *args, **kwargs)
    except pytest.skip.Exception as exc:
        if in_ci() and modname.split(".")[0] in TEST_EXTRAS:
            pytest.fail(f"CI installs the [test] extra, but {modname} does not import "
                        f"({exc.msg}); pip install -e '.[test]'", pytrace=False)
        raise


def pytest_configure(config):
    pytest.importorskip = strict_importorskip


def pytest_unconfigure(config):
    pytest.importorskip = _importorskip


def pytest_sessionfinish(session, exitstatus):
    # CI runs two steps, -m "not slow" and -m slow: a step whose marker selects nothing
    # (exit 5, say when every slow test is deselected by -k) is not a failure
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.option.markexpr:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(scope="session")
def example_models(tmp_path_factory):
    """{'vgg': path, 'mlp': path} of freshly exported .pt2 archives."""
    folder = tmp_path_factory.mktemp("examples")
    paths = save_examples(folder)
    return {p.stem: p for p in paths}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny matmuls on a busy 2-core machine: extra threads only
    fight each other); a module opts in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
