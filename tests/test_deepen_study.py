"""The deepen study (examples/deepen_study.py): a quick smoke run writes its tables and figure."""

import json

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from examples import deepen_study as ds  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow   # the study's --quick mode: about a minute
def test_quick_mode_writes_tables_figure_and_curves(tmp_path, capsys):
    runs = ds.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "## (a) Digits" in printed and "## (b) Byte-level Llama" in printed
    assert (tmp_path / "deepen_study.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = json.loads((tmp_path / "deepen_study.json").read_text())
    variants = {(r["part"], r["variant"]) for r in report["runs"]}
    assert variants == {(p, v) for p in ("mlp", "cnn") for v in ds.DIGITS_VARIANTS} | {
        ("lm", v) for v in ds.LM_VARIANTS}
    deepened = [r for r in runs if r.variant.startswith("deepened")]
    assert deepened and all(r.extra["change_at_insertion"] == 0 for r in deepened)
    # LLaMA Pro's recipe trains only the new blocks: fewer trainable parameters than as is
    lm = {r.variant: r for r in runs if r.part == "lm" and r.seed == 0}
    assert lm["deepened, new only"].extra["trainable"] < lm["as is"].extra["trainable"] \
        < lm["deepened"].extra["trainable"]
    table = (tmp_path / "deepen_study.md").read_text()
    assert "| MLP | deepened |" in table and "| deepened, new only | 6 |" in table
    assert not list(tmp_path.glob(".*"))   # written atomically: no temporary files left
