"""Deepening a Hugging Face checkpoint folder: which layers get copies, and the transformers check.

``deepen_folder`` turns a DeepenConfig (``blocks``, ``where``, ``zero``) into the
arguments of ``expand_checkpoint``, which streams the folder tensor by tensor;
``check_expanded`` loads both folders with transformers' AutoModel and compares
their outputs, the proof that every new block starts as the identity.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

from ..config import DeepenConfig, How
from ..errors import ConfigError, LoadError, VerificationError
from ..load.hf import quiet_transformers
from ..verify import ParityReport, compare_outputs
from .decide import spread
from .stream import ExpansionReport, checkpoint_stack, expand_checkpoint

__all__ = ["check_expanded", "deepen_folder"]


def deepen_folder(src: str | Path, dst: str | Path, config: DeepenConfig, *,
                  dry_run: bool = False) -> ExpansionReport:
    """Expand the checkpoint folder ``src`` into ``dst`` as ``config`` says, streaming.

    ``config.where`` (globs on ``<prefix>.<i>`` or plain indices) picks the layers
    that may get a copy; ``config.blocks`` copies are spread evenly over them (one
    copy after each matched layer when ``blocks`` is None); without ``where``,
    ``blocks`` copies are spread over the whole stack.

    Args:
        src: a folder with safetensors weights and (usually) config.json.
        dst: a new or empty folder.
        config: a DeepenConfig; ``how`` must allow copies (a folder has no graph).
        dry_run: decide and check everything, write nothing.

    Returns:
        The ExpansionReport of ``expand_checkpoint``.

    Raises:
        ConfigError: ``how="new"``, a ``where`` that matches no layer, more blocks than
            matched layers, or anything ``expand_checkpoint`` refuses.
        LoadError, ExportError: as ``expand_checkpoint``.

    Example:
        >>> deepen_folder("llama-7b", "llama-pro-8b", DeepenConfig(blocks=8))  # doctest: +SKIP
    """
    if config.how is How.NEW:
        raise ConfigError("a checkpoint folder grows by copies of its layers (--how copy or "
                          "auto); new residual layers need a model file")
    options: dict = {"zero": list(config.zero) or "auto", "dry_run": dry_run,
                     "prefix": config.prefix}
    if config.where:
        prefix, n = checkpoint_stack(src, config.prefix)
        matched = [i for i in range(n) if any(fnmatch.fnmatchcase(f"{prefix}.{i}", w)
                                                or w == str(i) for w in config.where)]
        if not matched:
            raise ConfigError(f"--where {' '.join(config.where)} matches none of {prefix}.0 .. "
                              f"{prefix}.{n - 1}")
        count = config.blocks or len(matched)
        if count > len(matched):
            raise ConfigError(f"--blocks {count} but --where matches {len(matched)} layer(s)")
        options["insert_after"] = [matched[i] for i in spread(len(matched), count)]
    else:
        options["blocks"] = config.blocks
    return expand_checkpoint(src, dst, **options)


def check_expanded(src: str | Path, dst: str | Path, *, shape: tuple[int, ...] = (1, 8),
                   vocab: int | None = None) -> ParityReport | None:
    """Load both folders with transformers' AutoModel and compare their last hidden states.

    Args:
        src, dst: the original and the expanded checkpoint folders.
        shape: the token ids' shape (batch, length).
        vocab: ids are drawn from [0, vocab) (default: the config's vocab_size).

    Returns:
        The ParityReport; None when transformers is not installed (nothing checked).

    Raises:
        LoadError: transformers could not load a folder.
        VerificationError: the outputs differ beyond the rewrite tolerance.
    """
    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers

    with quiet_transformers(transformers):
        try:
            before = transformers.AutoModel.from_pretrained(src).eval()
            after = transformers.AutoModel.from_pretrained(dst).eval()
        except Exception as exc:   # any failure inside transformers: report it in one line
            raise LoadError(f"transformers could not load the checkpoints to check them "
                            f"({type(exc).__name__}: {str(exc)[:120]}); pass --no-verify "
                            "(verify=False) to skip the check") from exc
        top = vocab or getattr(before.config, "vocab_size", None) or 2
        ids = torch.randint(0, top, shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = before(ids), after(ids)
    parity = compare_outputs([want.last_hidden_state], [got.last_hidden_state], check="rewrite")
    if not parity.ok:
        raise VerificationError(f"the expanded checkpoint's outputs differ from the original's "
                                f"({parity.describe()}); this is a ressurgeon bug, please "
                                "report it")
    return parity
