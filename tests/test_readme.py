"""README's commands and figures, checked against what the tool prints and the committed results.

- every ``ressurgeon`` command README shows names a real command and real flags (its
  ``--help``), and the Quick start's commands run on the bundled example models (slow step);
- the pasted ``diagnose`` output has the table the tool prints now (title, columns, rows);
- each documented ``python examples/<study>.py`` starts as written (``--help``; the studies'
  ``--quick`` modes run in the slow step, tests/test_*_study.py and test_train_digits.py);
- every number in README's study tables is one of the committed results' (rounded as shown),
  and the deepen study's tables and its cost sentence are recomputed from its committed JSON;
- ``.ci/run`` runs README's test command and nothing else.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RESULTS = REPO / "examples" / "results"


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def shell_lines() -> list[str]:
    """Every command line of README's bash blocks (comments and continuations joined)."""
    lines = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            lines.extend(part.strip() for part in line.split("&&") if part.strip())
    return lines


def ressurgeon_commands() -> list[list[str]]:
    """The bash blocks' ``ressurgeon`` lines and the inline `ressurgeon ...` examples."""
    inline = re.findall(r"`(ressurgeon [^`]+)`", README)
    return [shlex.split(line)[1:] for line in shell_lines() + inline
            if line.startswith("ressurgeon ")]


def section(start: str, end: str) -> str:
    text = README[README.index(start):]
    return text[:text.index(end, len(start))]


# -- commands ----------------------------------------------------------------------------------

def test_ci_runs_the_readme_test_command():
    block = section("Run the whole test suite:", "```\n\n").split("```bash\n")[1].strip()
    run = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines()
           if ln.strip() and not ln.startswith(("#", "set ", "cd ", "export "))]
    assert run == [block]
    assert '-m "not slow"' in block and "-m slow" in block


def test_every_readme_command_and_flag_exists():
    commands = ressurgeon_commands()
    assert len(commands) >= 10
    helps: dict[str, str] = {}
    for argv in commands:
        name = argv[0]
        if name not in helps:
            result = run_cli(name, "--help")
            assert result.exit_code == 0, (name, result.output)
            helps[name] = result.output
        for flag in (a.split("=")[0] for a in argv[1:] if a.startswith("-")):
            assert flag in helps[name], f"README: `ressurgeon {' '.join(argv)}`: no {flag}"


QUICK_START = section("### Command line", "### Python")


@pytest.mark.slow   # six CLI runs, ONNX export included
def test_the_quick_start_commands_run(example_models, tmp_path, monkeypatch):
    models = tmp_path / "examples" / "models"
    models.mkdir(parents=True)
    for path in example_models.values():
        shutil.copy(path, models / path.name)
    monkeypatch.chdir(tmp_path)
    lines = [ln for ln in code_blocks("bash")[2].splitlines() if ln.startswith("ressurgeon ")]
    assert lines and all(ln in QUICK_START for ln in lines)
    for line in lines:
        argv = shlex.split(line)[1:]
        result = run_cli(*argv)
        assert result.exit_code == 0, (line, result.output)
        if "-o" in argv:
            assert (tmp_path / argv[argv.index("-o") + 1]).stat().st_size > 0, line
        if "--json" in argv:
            assert {"skips", "parity"} <= set(json.loads(result.stdout)), line
        if "--onnx" in argv:
            assert (tmp_path / argv[argv.index("--onnx") + 1]).stat().st_size > 0, line


def _table_shape(text: str) -> tuple[str, list[str], int, str]:
    """(title, column names, body rows, summary line's start) of a rich table printed as text."""
    lines = text.strip("\n").splitlines()
    header = next(ln for ln in lines if ln.startswith("┃"))
    columns = [c.strip() for c in header.strip("┃").split("┃")]
    rows = sum(ln.startswith("│") for ln in lines)
    summary = lines[-1].split(":")[0]
    return lines[0], columns, rows, summary


def test_the_pasted_diagnose_output_is_what_diagnose_prints(example_models, monkeypatch):
    start = README.index("Output of `ressurgeon diagnose examples/models/mlp.pt2`")
    pasted = README[README.index("```\n", start) + 4:]
    pasted = pasted[:pasted.index("```")]
    monkeypatch.setenv("COLUMNS", "90")
    result = run_cli("diagnose", example_models["mlp"])
    assert result.exit_code == 0, result.output
    assert _table_shape(result.stdout) == _table_shape(pasted)
    # the numbers too: same model, same seed, same example input
    gains = lambda text: re.findall(r"│ (x[\d.]+) │", text)   # noqa: E731
    assert gains(result.stdout) == gains(pasted)


def test_the_summary_counts_its_nouns_and_explains_only_what_it_shows(tmp_path):
    import torch

    from models import deep_mlp

    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(deep_mlp(4, 8).eval(), (torch.randn(2, 8),)), path)
    result = run_cli("add-skips", path, "--span", "3", "--max-skips", "1", "-o",
                     tmp_path / "o.pt2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "1 parameter added" in text and "1 parameters" not in text, text
    assert "proj/2" not in text, text       # no strided projection in this table


STUDIES = sorted(set(re.findall(r"`python (examples/\w+\.py)", README)))


def test_readme_documents_each_study():
    studies = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").glob("*.py")
                     if p.stem.endswith("_study") or p.stem == "train_digits")
    assert STUDIES == studies


@pytest.mark.parametrize("script", STUDIES)
def test_a_documented_study_command_starts_as_written(script):
    # `python examples/deepen_study.py` once failed with ModuleNotFoundError (worked with -m)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--quick" in done.stdout


# -- figures -----------------------------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.])[−+-]?\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?")


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def value(token: str) -> float:
    return float(token.replace("−", "-").replace(",", ""))


def shown_as(token: str, candidates: list[float]) -> bool:
    """Whether some candidate, rounded as ``token`` is written, reads as ``token``."""
    mantissa = token.lower().split("e")[0]
    exp = int(token.lower().split("e")[1]) if "e" in token.lower() else 0
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    half = 0.5 * 10.0 ** (exp - decimals) * (1 + 1e-9)
    return any(abs(abs(c) - abs(value(token))) <= half for c in candidates)


def table_rows(text: str) -> list[list[str]]:
    rows = [ln for ln in text.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]   # no header


STUDY_SECTIONS = [
    ("## Does it help? Deep plain networks on digits", "### Which join", "train_digits"),
    ("### Which join should I pick?", "### Surgery on a trained network", "joins_study"),
    ("### Surgery on a trained network", "## Does it put shortcuts", "retrofit_study"),
    ("**Does it help?** `python examples/deepen_study.py`", "## Rewiring the residual stream",
     "deepen_study"),
    ("**Does it pay?** `python examples/rewire_study.py`", "## Hugging Face", "rewire_study"),
    ("**Does it help?** `python examples/recurrent_study.py`", "### Zoo", "recurrent_study"),
]


@pytest.mark.parametrize("start,end,study", STUDY_SECTIONS, ids=[s for *_, s in STUDY_SECTIONS])
def test_readme_study_tables_are_the_committed_results(start, end, study):
    md = (RESULTS / f"{study}.md").read_text()
    data = json.loads((RESULTS / f"{study}.json").read_text())
    assert data and (RESULTS / f"{study}.png").exists()
    candidates = [value(t) for t in numbers(md)]
    rows = table_rows(section(start, end))
    assert rows, study
    missing = [(row[0], token) for row in rows for cell in row[1:] for token in numbers(cell)
               if not shown_as(token, candidates)]
    assert not missing, f"README numbers not in examples/results/{study}.md: {missing}"


def _deepen():
    pytest.importorskip("sklearn")
    pytest.importorskip("transformers")
    from examples import deepen_study as ds

    data = json.loads((RESULTS / "deepen_study.json").read_text())
    runs = [ds.Run(**{**r, "curve": [tuple(p) for p in r["curve"]]}) for r in data["runs"]]
    fields = ds.Settings.__dataclass_fields__
    settings = ds.Settings(**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in data["settings"].items() if k in fields})
    return ds, runs, settings


def test_deepen_tables_are_computed_from_the_committed_json():
    ds, runs, settings = _deepen()
    md = (RESULTS / "deepen_study.md").read_text()
    assert ds.digits_table(runs, settings).replace("**", "") in md.replace("**", "")
    assert ds.lm_table(runs, settings) in md


def test_the_deepen_cost_sentence_is_the_committed_seconds():
    _, runs, _ = _deepen()
    seconds = {(r.variant, r.seed): r.seconds for r in runs if r.part == "lm"}
    seeds = sorted({s for _, s in seconds})
    mean = lambda v: sum(seconds[(v, s)] for s in seeds) / len(seeds)   # noqa: E731
    ratio = mean("deepened") / mean("as is")
    per_seed = [seconds[("deepened", s)] / seconds[("as is", s)] for s in seeds]
    text = " ".join(section("Deepening helped the digits CNN", "\n\n").split())
    assert f"at {ratio:.2f}x the mean seconds per run" in text, text
    assert (f"per seed {per_seed[0]:.2f}x, {per_seed[1]:.2f}x and {per_seed[2]:.2f}x"
            in text), text


@pytest.mark.parametrize("name,marker,part", [
    ("zoo", "includes the ONNX export, the ONNX Runtime checks and fold", None),
    ("zoo", "one more forward and the mirror verdicts", "tasks"),
    ("gpu", "events, 12 alternating rounds of 40 iterations", None),
])
def test_quoted_benchmark_tables_are_their_committed_results(name, marker, part):
    # benchmarks/results/ is git-ignored: the figures README quotes are committed here
    path = f"benchmarks/results_committed/{name}.json"
    data = json.loads((REPO / path).read_text())
    data = data[part] if part else data
    assert {"machine", "versions", "command", "source", "results"} <= set(data), name
    text = README[README.index(marker):]
    assert path in text[:text.index("|")], f"README's {name} table does not name {path}"
    lines = text[text.index("\n|"):].strip().splitlines()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines
            if ln.startswith("|")][:len(data["results"]) + 2]
    header, body = rows[0], rows[2:]
    assert [dict(zip(header, row)) for row in body] == data["results"]
