"""What every reader says: the safe routes, the trust hint, sizes and name lists in messages."""

from __future__ import annotations





SAFE_ROUTES = ("save model.state_dict() and pass --arch module:callable, "
               "or torch.export.save the model to a .pt2 archive")


TRUST_ONLY_YOURS = "pass --trust-pickle only for files you made yourself"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _first(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
