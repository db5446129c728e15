"""What several test modules share: running the CLI in-process, and trained-like gates."""

import torch
from typer.testing import CliRunner

from ressurgeon.cli import app

_runner = CliRunner()


def run_cli(*args):
    """Invoke ``ressurgeon ARGS`` in-process; the result has exit_code, stdout, stderr."""
    return _runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code=2):
    """Assert the command failed with ``code`` and one ``error:`` line, no traceback; return it."""
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def with_gates(result, values):
    """Set the gates of a rewritten module to ``values`` in order, as fine-tuning would."""
    gates = [p for n, p in result.module.named_parameters() if n.endswith(".gate")]
    with torch.no_grad():
        for p, v in zip(gates, values, strict=True):
            p.fill_(v)
    return result


def gates_after_rewrite(monkeypatch, value: float) -> None:
    """A rewrite bug, simulated: every rewrite's gates start at ``value`` instead of their
    init (the pass's own verification must then catch it)."""
    import ressurgeon.skips.surgery as surgery

    rewrite = surgery.rewrite_traced

    def broken(*args, **kwargs):
        result = rewrite(*args, **kwargs)
        gates = [p for n, p in result.module.named_parameters() if n.endswith(".gate")]
        return with_gates(result, [value] * len(gates))

    monkeypatch.setattr(surgery, "rewrite_traced", broken)
