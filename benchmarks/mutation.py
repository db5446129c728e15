"""Mutation check: would the tests notice if the checks we rely on broke?

Each mutant is one small edit of the source (a comparison flipped, a raise
dropped, a tolerance widened) in the code that decides whether a result is
trusted: the verification (``ressurgeon/verify.py`` and the parity verdict of
``ressurgeon/skips/surgery.py``), the plan check (``ressurgeon/skips/rewrite.py``
and ``ressurgeon/plans.py``). The edit is applied to a temporary copy of the
repository and only the test files that cover that code run there
(``-p no:xdist -x``: the first failure kills the mutant). A mutant that the
tests survive is a check no test holds in place.

Not part of the test suite (it runs the selected tests once per mutant):

    python benchmarks/mutation.py                # every mutant
    python benchmarks/mutation.py --list         # the mutants, nothing run
    python benchmarks/mutation.py -k plan        # the mutants whose name contains "plan"
    python benchmarks/mutation.py --json out.json

and the security validator (``ressurgeon/load/allowlist.py``, ``program.py``,
``expressions.py``, ``nn_pickle.py``). Another check joins by adding ``Mutant`` rows to
``MUTANTS``, each with the tests that guard it. Exit status: 0 when every
mutant is killed, 1 when some survive, 2 when a mutant's text is not found in
the source (the source moved on: update the row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # file, relative to the repository
    old: str           # text that occurs exactly once in the file
    new: str
    tests: tuple[str, ...]


VERIFY_TESTS = ("tests/test_verify.py",
                "tests/test_attacks.py::test_nan_in_a_rewritten_output_fails_verification",
                "tests/test_attacks.py::test_a_shortcut_path_that_overflows_is_rejected_with_a_reason",
                "tests/test_cli.py::test_a_preserve_rewrite_that_changes_the_outputs_exits_3",
                "tests/test_surgery.py::test_parity_helper_reports_differences",
                "tests/test_surgery.py::test_forward_that_edits_its_input_in_place",
                "tests/test_surgery.py::test_flipping_a_preserve_gate_changes_outputs")
PLAN_TESTS = ("tests/test_surgery.py::test_plan_errors_name_the_problem",
              "tests/test_surgery.py::test_plan_layer_names_must_match_the_graph",
              "tests/test_surgery.py::test_plan_round_trips_through_json_and_reapplies",
              "tests/test_plan_check.py",
              "tests/test_attacks.py::test_malformed_plans",
              "tests/test_attacks.py::test_plans_that_are_not_regular_files",
              "tests/test_attacks.py::test_a_plan_without_input_shapes_takes_them_from_the_flag")
TRUST_TESTS = ("tests/test_trust.py", "tests/test_names.py")
A, G, E, N = ("ressurgeon/load/allowlist.py", "ressurgeon/load/program.py",
              "ressurgeon/load/expressions.py", "ressurgeon/load/nn_pickle.py")
V, S, R, P = ("ressurgeon/verify.py", "ressurgeon/skips/surgery.py", "ressurgeon/skips/rewrite.py",
              "ressurgeon/plans.py")

MUTANTS = [
    # -- verification ------------------------------------------------------------------------
    Mutant("verify: fp32 rewrite tolerance 1e-6 -> 1e-2", V,
           "torch.float32: Tolerance(1e-6),", "torch.float32: Tolerance(1e-2),", VERIFY_TESTS),
    Mutant("verify: bfloat16 rewrite tolerance 1e-2 -> 1.0", V,
           "torch.bfloat16: Tolerance(1e-2),   # 8-bit", "torch.bfloat16: Tolerance(1.0),   # 8-bit",
           VERIFY_TESTS),
    Mutant("verify: bound ignores the output's scale", V,
           "return self.atol + self.rtol * max(1.0, scale)", "return self.atol + self.rtol",
           VERIFY_TESTS),
    Mutant("verify: ok ignores new non-finite values", V,
           "return self.nonfinite == 0 and self.max_abs_diff <= self.tolerance",
           "return self.max_abs_diff <= self.tolerance", VERIFY_TESTS),
    Mutant("verify: ok uses < instead of <=", V,
           "self.max_abs_diff <= self.tolerance", "self.max_abs_diff < self.tolerance",
           VERIFY_TESTS),
    Mutant("verify: a different number of outputs is accepted", V,
           "    if len(expected) != len(actual):\n        raise",
           "    if False:\n        raise", VERIFY_TESTS),
    Mutant("verify: a changed output shape is accepted", V,
           "        if tuple(want.shape) != tuple(have.shape):\n            raise",
           "        if False:\n            raise", VERIFY_TESTS),
    Mutant("verify: finite -> NaN/inf not counted", V,
           "new_bad += int((finite & ~torch.isfinite(have)).sum())", "pass", VERIFY_TESTS),
    Mutant("verify: NaN == NaN not treated as the same value", V,
           "same = (want == have) | (torch.isnan(want) & torch.isnan(have))",
           "same = want == have", VERIFY_TESTS),
    Mutant("verify: a changed non-finite value is accepted", V,
           "new_bad += int((~finite & ~same).sum())", "pass", VERIFY_TESTS),
    Mutant("verify: worst difference is the smallest", V,
           "worst = max(worst, diff.max().item())", "worst = max(worst, diff.min().item())",
           VERIFY_TESTS),
    Mutant("verify: the dtype's tolerance row is ignored", V,
           "tol = table.get(dtype or want.dtype, table[torch.float32])",
           "tol = table[torch.float32]", VERIFY_TESTS),
    Mutant("verify: the inputs are not copied for each model", V,
           "out = model(*(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs),",
           "out = model(*(t for t in inputs),", VERIFY_TESTS),
    Mutant("surgery: a preserve rewrite that changes the outputs is accepted", S,
           "if config.init is Init.PRESERVE and inserted and not parity.ok:",
           "if False:", VERIFY_TESTS),
    Mutant("surgery: new NaN/inf in the rewritten outputs accepted", S,
           "    if parity.nonfinite:\n        raise VerificationError",
           "    if False:\n        raise VerificationError", VERIFY_TESTS),
    # -- plan check --------------------------------------------------------------------------
    Mutant("plan: two skips may end at one node", R,
           "        if skip.target in targets:\n", "        if False:\n", PLAN_TESTS),
    Mutant("plan: a kind the join does not take is accepted", R,
           "if skip.kind not in join.planned_kinds:", "if False:", PLAN_TESTS),
    Mutant("plan: layer names are not checked", R,
           "if given and given != actual:", "if False:", PLAN_TESTS),
    Mutant("plan: a source that does not dominate is accepted", R,
           "if Reason.NOT_DOMINATED in enforced:", "if False:", PLAN_TESTS),
    Mutant("plan: ends of different dtypes are accepted", R,
           "if Reason.DTYPE in enforced:", "if False:", PLAN_TESTS),
    Mutant("plan: a non-finite shortcut path is accepted", R,
           "if Reason.NON_FINITE in enforced:", "if False:", PLAN_TESTS),
    Mutant("plan: identity between different shapes is accepted", R,
           'if skip.kind == "identity" and verdict.kind != "identity":', "if False:", PLAN_TESTS),
    Mutant("plan: a wrong stride is accepted", R,
           'if skip.kind != "identity" and verdict.stride != skip.stride:', "if False:",
           PLAN_TESTS),
    Mutant("plan: overlapping plan skips are not reported", R,
           "overlapping = {i for users in owners.values() if len(users) > 1 for i in users",
           "overlapping = {i for users in () for i in users", PLAN_TESTS),
    Mutant("plans: any plan version is accepted", P,
           "if data.get(\"version\", PLAN_VERSION) != PLAN_VERSION:", "if False:", PLAN_TESTS),
    Mutant("plans: entries that are not a list of objects pass", P,
           "if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):",
           "if False:", PLAN_TESTS),
    Mutant("plans: zero-sized input shapes are accepted", P,
           "all(type(d) is int and 0 < d <= MAX_DIM for d in s)",
           "all(type(d) is int and 0 <= d <= MAX_DIM for d in s)", PLAN_TESTS),
    Mutant("plans: oversized plan files are read", P,
           "if path.stat().st_size > MAX_PLAN_BYTES:", "if False:", PLAN_TESTS),
    Mutant("plans: a plan that is not a regular file is read", P,
           "if not path.is_file():", "if False:", PLAN_TESTS),
    # -- the .pt2 / pickle validator (ressurgeon/load/) ------------------------------------
    Mutant("validate: any string passes as an identifier", A,
           "        if not is_identifier(value):\n            raise self.fail(field, value, f\"a Python identifier",
           "        if False:\n            raise self.fail(field, value, f\"a Python identifier",
           TRUST_TESTS),
    Mutant("validate: any string passes as a dotted path", A,
           "        if not is_fqn(text, allow_empty=allow_empty):",
           "        if False:", TRUST_TESTS),
    Mutant("validate: any call target passes the operator allowlist", A,
           "        if not ((op and op[\"ns\"] in OP_NAMESPACES) or _HIGHER_ORDER.fullmatch(value)\n"
           "                or value in SYMBOLIC_OPS):",
           "        if False:", TRUST_TESTS),
    Mutant("validate: nn_module_stack paths are not checked", G,
           "            self.fqn(path, f\"{where} path\", allow_empty=True, call_index=True)",
           "            pass", TRUST_TESTS),
    Mutant("validate: shape expressions are not bounded in size", E,
           "    if bits > MAX_EXPR_BITS:", "    if False:", TRUST_TESTS),
    Mutant("validate: stride-0 expansion is not capped", A,
           "        if made_up > EXPANSION_CAP or t.numel() > MAX_ELEMENTS:", "        if False:",
           TRUST_TESTS),
    Mutant("validate: torch.nn pickle child names are not checked", N,
           "                if not (is_fqn(key) and \".\" not in key):", "                if False:",
           TRUST_TESTS),
]


def copy_repo(dest: Path) -> None:
    """The files the tests need (source, tests, examples, benchmarks, metadata), no venv/git."""
    skip = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "results",
                                  ".pytest_cache")
    for name in ("ressurgeon", "tests", "examples", "benchmarks"):
        shutil.copytree(REPO / name, dest / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        shutil.copy2(REPO / name, dest / name)


def run_mutant(m: Mutant, copy: Path, timeout: float) -> dict:
    target = copy / m.path
    original = target.read_text()
    if original.count(m.old) != 1:
        return {"name": m.name, "outcome": "not-found", "seconds": 0.0}
    target.write_text(original.replace(m.old, m.new))
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("CI", None)
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p",
                               "no:cacheprovider", "-x", "-q", "--no-header",
                               "-o", "addopts=", *m.tests],
                              cwd=copy, env=env, capture_output=True, text=True,
                              timeout=timeout)
        outcome = "survived" if done.returncode == 0 else "killed"
        failed = [ln for ln in done.stdout.splitlines() if ln.startswith("FAILED ")]
        detail = failed[0][7:] if failed else done.stdout.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        outcome, detail = "killed", "timeout"
    finally:
        target.write_text(original)
    return {"name": m.name, "outcome": outcome, "by": detail,
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.k in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}  ({m.path})")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="ressurgeon-mutants-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        for m in mutants:
            r = run_mutant(m, copy, args.timeout)
            results.append(r)
            print(f"{r['outcome']:9s} {r['seconds']:6.1f}s  {m.name}"
                  + (f"  [{r['by']}]" if r["outcome"] == "killed" else ""), flush=True)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("killed", "survived",
                                                                    "not-found")}
    print(f"{counts['killed']} killed, {counts['survived']} survived, "
          f"{counts['not-found']} not found, of {len(results)}")
    for r in results:
        if r["outcome"] == "survived":
            print(f"  survived: {r['name']}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "counts": counts}, indent=2) + "\n")
    return 2 if counts["not-found"] else 1 if counts["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
