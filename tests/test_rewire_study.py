"""The rewire study (examples/rewire_study.py): a quick smoke run writes its table and curves."""

import json

import pytest

pytest.importorskip("transformers")

from examples import rewire_study as rs  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_mode_writes_the_table_and_every_curve(tmp_path, capsys):
    runs = rs.main(["--quick", "--out", str(tmp_path)])
    assert "| scratch | hyper |" in capsys.readouterr().out
    report = json.loads((tmp_path / "rewire_study.json").read_text())
    assert {(r["part"], r["variant"]) for r in report["runs"]} == {
        (p, k) for p in ("scratch", "retrofit") for k in rs.KINDS}
    for part in ("scratch", "retrofit"):   # exact at insertion: the same loss before step 1
        first = {r.curve[0][2] for r in runs if r.part == part and r.seed == 0}
        assert len(first) == 1, (part, first)
    assert "| retrofit | dwa |" in (tmp_path / "rewire_study.md").read_text()
    assert not list(tmp_path.glob(".*"))
