"""Stage 5's comparison primitive, ``compare_outputs``, at its edges: the bound itself, the
dtype's row, the output's scale, non-finite values, and inputs a forward edits in place.
(benchmarks/mutation.py mutates verify.py; these are the tests that kill its mutants.)"""

import pytest
import torch
import torch.nn as nn

from ressurgeon import VerificationError
from ressurgeon.verify import TOLERANCES, ParityReport, check_parity, compare_outputs


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_the_bound_itself_passes_and_anything_above_fails():
    assert ParityReport(max_abs_diff=1e-6, tolerance=1e-6, outputs=1).ok
    assert not ParityReport(max_abs_diff=1.5e-6, tolerance=1e-6, outputs=1).ok
    assert not ParityReport(max_abs_diff=0.0, tolerance=1e-6, outputs=1, nonfinite=1).ok


def test_the_worst_difference_over_every_output_is_reported():
    report = compare_outputs([t(0.0, 1.0, 2.0), t(5.0)], [t(0.0, 1.5, 2.1), t(5.0)],
                             check="rewrite")
    assert report.max_abs_diff == pytest.approx(0.5) and report.outputs == 2 and not report.ok


def test_each_dtype_has_its_own_row():
    assert TOLERANCES["rewrite"][torch.float32].atol == 1e-6        # README states these
    assert TOLERANCES["rewrite"][torch.bfloat16].atol == 1e-2
    fp32 = compare_outputs([t(1.0)], [t(1.0001)], check="rewrite")
    assert fp32.tolerance == pytest.approx(1e-6) and not fp32.ok
    bf16 = compare_outputs([t(1.0, dtype=torch.bfloat16)], [t(1.0078125, dtype=torch.bfloat16)],
                           check="rewrite")
    assert bf16.tolerance == pytest.approx(1e-2) and bf16.ok
    far = compare_outputs([t(1.0, dtype=torch.bfloat16)], [t(1.5, dtype=torch.bfloat16)],
                          check="rewrite")
    assert not far.ok


def test_relative_rows_scale_with_the_largest_output():
    # fold: rtol 1e-4 of max(1, max |expected|) = 0.1 here
    report = compare_outputs([t(1000.0, 1.0)], [t(1000.05, 1.0)], check="fold")
    assert report.tolerance == pytest.approx(0.1) and report.ok
    small = compare_outputs([t(0.5)], [t(0.50005)], check="fold")   # scale below 1 counts as 1
    assert small.tolerance == pytest.approx(1e-4) and small.ok


def test_non_finite_values():
    inf, nan = float("inf"), float("nan")
    new = compare_outputs([t(1.0, 2.0)], [t(1.0, inf)], check="rewrite")
    assert new.nonfinite == 1 and not new.ok and "became NaN or infinite" in new.describe()
    kept = compare_outputs([t(nan, inf, 1.0)], [t(nan, inf, 1.0)], check="rewrite")
    assert kept.ok and kept.original_nonfinite == 2 and kept.nonfinite == 0
    flipped = compare_outputs([t(inf, 1.0)], [t(-inf, 1.0)], check="rewrite")
    assert flipped.nonfinite == 1 and not flipped.ok


def test_structure_changes_raise():
    with pytest.raises(VerificationError, match="from 1 tensor"):
        compare_outputs([t(1.0)], [t(1.0), t(2.0)], check="rewrite")
    with pytest.raises(VerificationError, match=r"shape changed from \(2,\) to \(3,\)"):
        compare_outputs([t(1.0, 2.0)], [t(1.0, 2.0, 3.0)], check="rewrite")


class EditsItsInput(nn.Module):
    def forward(self, x):
        return x.sub_(1.0) * 2


def test_each_model_gets_its_own_copy_of_the_inputs():
    x = torch.ones(3)
    report = check_parity(EditsItsInput(), EditsItsInput(), (x,))
    assert report.max_abs_diff == 0.0 and report.ok
    assert torch.equal(x, torch.ones(3))


def test_a_rewrite_that_outputs_nan_where_the_original_is_finite_is_a_bug(monkeypatch):
    # simulated: the gates start at NaN, so every output is NaN while each shortcut's path is
    # finite (the NaN/inf guard that removes shortcuts does not apply): the verdict names it
    from helpers import gates_after_rewrite
    from models import deep_mlp
    from ressurgeon import SkipConfig, add_skips

    gates_after_rewrite(monkeypatch, float("nan"))
    with pytest.raises(VerificationError, match="outputs NaN or infinity where the original "
                                                "does not.*ressurgeon bug"):
        add_skips(deep_mlp(6, 16).eval(), (torch.randn(2, 16),), SkipConfig(span=2))
