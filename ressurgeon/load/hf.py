"""Hugging Face transformers models: how they are captured, and their save_pretrained folders.

The capture rule, one for every entry point (``trace_model`` applies it to the
copy it traces; the user's model is never changed):

- **No KV cache.** Every transformers config in the model gets
  ``use_cache=False``. A cache (``DynamicCache``) is an object for generation,
  not a tensor: torch.export cannot return it, and a rewritten graph has no use
  for it. The parity check calls the original with ``use_cache=False`` too
  (``forward_kwargs``), so both compute the same outputs.
- **Outputs.** A ``ModelOutput`` becomes a plain dict of its fields that are
  not None, in the same order (``out["logits"]`` works on both; ``out.logits``
  only on the original). A ``.pt2`` written from it loads without transformers.
- **Sequence length.** As for any torch.export capture, only the batch is
  symbolic: another sequence length raises ShapeError unless the sequence dim
  is kept dynamic (``TraceOptions(dynamic=(1,))``, ``--dynamic 1``).

A ``save_pretrained`` folder (``config.json`` plus ``model.safetensors``, or
shards listed in ``model.safetensors.index.json``) loads without running code
from the folder and without the network: ressurgeon reads ``config.json`` as
JSON and the weights with safetensors, builds the class ``architectures``
names from the installed transformers, and hands it the tensors; transformers
never opens a file of the folder. A config with ``auto_map`` (code shipped in
the folder, ``trust_remote_code``) is refused; ``pytorch_model.bin`` weights (a
pickle) only load with ``trust_pickle``, and even then with torch's
weights-only unpickler.

transformers is imported only to load a folder: an object that is a
transformers model means transformers was imported already.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
from pathlib import Path

import torch.nn as nn

from ..errors import LoadError, UnsafeFileError, brief
from .common import TRUST_ONLY_YOURS
from .weights import read_weights
from .safetensors import CONFIG, read_checkpoint, read_config, read_index

SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DEFAULT_SEQUENCE = 16         # default example length: enough to show every layer


def is_pretrained(model: object) -> bool:
    """True for a transformers ``PreTrainedModel`` (never imports transformers).

    Any such model's class imported ``transformers.modeling_utils``; until then
    nothing is one (and asking the lazy ``transformers`` module would import it).
    """
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    return isinstance(base, type) and isinstance(model, base)


def without_cache(model: nn.Module) -> None:
    """Set ``use_cache=False`` on every transformers config in ``model``; pass a copy you own.

    Every submodule that is a transformers model is visited (a wrapper's inner
    model, a multimodal model's language model), with its sub-configs.
    """
    for module in model.modules():
        if not is_pretrained(module):
            continue
        config = module.config
        base = getattr(sys.modules.get("transformers.configuration_utils"),
                       "PretrainedConfig", type(config))
        subs = [v for v in vars(config).values() if isinstance(v, base)]
        for cfg in (config, *subs):
            if getattr(cfg, "use_cache", None):
                cfg.use_cache = False


def forward_kwargs(model: nn.Module) -> dict:
    """Keyword arguments that make ``model`` compute what its capture computes.

    ``{"use_cache": False}`` for a transformers model whose forward takes
    ``use_cache``; otherwise none.
    """
    if not is_pretrained(model):
        return {}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def vocab_size(model: nn.Module) -> int | None:
    """The number of token ids a transformers model's input embedding takes, else None."""
    if not is_pretrained(model):
        return None
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(embedding, "num_embeddings", None)


def example_specs(model: nn.Module) -> list[tuple[tuple[int, ...], str | None]]:
    """Default example inputs for a transformers model, from its config; [] when unknown.

    Token models (first input ``input_ids``): one sequence of
    ``min(16, max positions)`` int64 ids. Image models (``pixel_values``):
    ``1, num_channels, image_size, image_size``. Encoder-decoder models need
    decoder inputs too, so they get none (pass ``--input-shape``).
    """
    if not is_pretrained(model):
        return []
    config = model.config
    try:
        first = next(iter(inspect.signature(model.forward).parameters))
    except (TypeError, ValueError, StopIteration):
        return []
    if getattr(config, "is_encoder_decoder", False) or first != model.main_input_name:
        return []
    if first == "input_ids":
        limits = [getattr(config, n, None) for n in ("max_position_embeddings", "n_positions")]
        length = min([DEFAULT_SEQUENCE] + [n for n in limits if isinstance(n, int) and n > 0])
        return [((1, length), "int64")]
    if first == "pixel_values":
        size = getattr(config, "image_size", None)
        height, width = (size, size) if isinstance(size, int) else tuple(size or (None, None))[:2]
        if not (isinstance(height, int) and isinstance(width, int)):
            return []
        return [((1, getattr(config, "num_channels", 3), height, width), None)]
    return []


# -- save_pretrained folders ---------------------------------------------------------------------

def is_pretrained_folder(path: Path) -> bool:
    """A folder holding a ``config.json``, as ``save_pretrained`` writes."""
    return path.is_dir() and (path / CONFIG).is_file()


def load_pretrained(folder: Path, *, trust_pickle: bool = False) -> nn.Module:
    """The transformers model saved in ``folder``, built without running its code.

    It comes in eval mode and without a KV cache (``use_cache=False``, the
    capture rule), so that exporting it directly (``ressurgeon export``) works
    too; set ``model.config.use_cache = True`` to generate with it.

    Raises:
        LoadError: transformers is missing, the config is unreadable, names
            code shipped in the folder (``auto_map``) or an architecture this
            transformers does not have, or the weights are missing or do not fit.
        UnsafeFileError: the weights are only a pickle (``pytorch_model.bin``)
            and ``trust_pickle`` is False.
    """
    config_data = _read_config(folder)
    if "auto_map" in config_data:
        raise LoadError(f"{folder}/{CONFIG} has auto_map: its architecture is Python code "
                        "shipped in the folder (trust_remote_code), which ressurgeon does not "
                        "run; load it in Python yourself (AutoModel.from_pretrained(..., "
                        "trust_remote_code=True) on a folder you trust) and pass the model to "
                        "add_skips")
    try:
        import transformers
    except ImportError as exc:
        raise LoadError(f"{folder} is a Hugging Face save_pretrained folder; reading it needs "
                        "transformers: pip install 'ressurgeon[hf]'") from exc
    config = _build_config(transformers, folder, config_data)
    cls = _model_class(transformers, folder, config)
    state = _read_folder_weights(folder, trust_pickle)
    try:
        with quiet_transformers(transformers):
            model, info = cls.from_pretrained(None, config=config, state_dict=state,
                                              output_loading_info=True)
    except Exception as exc:
        raise LoadError(f"the weights in {folder} do not fit {cls.__name__} ({brief(exc)}); "
                        "write the folder again with save_pretrained") from exc
    missing = list(info.get("missing_keys") or ())
    mismatched = [str(k[0]) if isinstance(k, tuple) else str(k)
                  for k in info.get("mismatched_keys") or ()]
    if missing or mismatched:
        shown = ", ".join((missing + mismatched)[:3])
        raise LoadError(f"the weights in {folder} do not fit {cls.__name__}: "
                        f"{'missing' if missing else 'other shape'} {shown}; those would start "
                        "random. Write the folder again with save_pretrained")
    without_cache(model)  # this object is ours: every command may export it as it is
    return model.eval()


def _read_config(folder: Path) -> dict:
    data = read_config(folder, "write the folder again with save_pretrained")
    if data is None or not isinstance(data.get("model_type"), str):
        raise LoadError(f"{folder / CONFIG} has no model_type; is {folder} a transformers "
                        "save_pretrained folder?")
    return data


def _build_config(transformers, folder: Path, data: dict):
    values = dict(data)
    model_type = values.pop("model_type")
    try:
        with quiet_transformers(transformers):
            return transformers.AutoConfig.for_model(model_type, **values)
    except Exception as exc:
        raise LoadError(f"{folder}/{CONFIG} describes a '{model_type}' model, which transformers "
                        f"{transformers.__version__} cannot build ({brief(exc)}); upgrade "
                        "transformers") from exc


def _model_class(transformers, folder: Path, config) -> type:
    """The class ``architectures`` names (e.g. GPT2LMHeadModel), else the base model class."""
    names = getattr(config, "architectures", None) or []
    name = names[0] if names and isinstance(names[0], str) else None
    if name is not None and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
        raise LoadError(f"{folder}/{CONFIG} names the architecture {name}, which transformers "
                        f"{transformers.__version__} does not have; upgrade transformers")
    try:
        return transformers.MODEL_MAPPING[type(config)]
    except KeyError as exc:
        raise LoadError(f"{folder}/{CONFIG} names no architecture and transformers has no base "
                        f"model for '{config.model_type}'") from exc


def _read_folder_weights(folder: Path, trust_pickle: bool) -> dict:
    """Every weight of the folder, read by safetensors (or, trusted, torch's weights-only reader)."""
    if (folder / SAFE_WEIGHTS).is_file() or (folder / SAFE_INDEX).is_file():
        return read_checkpoint(folder, "model")
    pickled = [n for n in (PICKLE_WEIGHTS, PICKLE_INDEX) if (folder / n).is_file()]
    if pickled and not trust_pickle:
        raise UnsafeFileError(
            f"{folder} holds its weights only as {pickled[0]}, a pickle; save the model again "
            f"with save_pretrained(..., safe_serialization=True) to get {SAFE_WEIGHTS}, or "
            f"{TRUST_ONLY_YOURS}")
    if (folder / PICKLE_WEIGHTS).is_file():
        return _read_pickled(folder / PICKLE_WEIGHTS)
    if (folder / PICKLE_INDEX).is_file():
        state: dict = {}
        for shard in read_index(folder / PICKLE_INDEX, ".bin")[1]:
            state.update(_read_pickled(shard))
        return state
    raise LoadError(f"{folder} has a {CONFIG} but no weights ({SAFE_WEIGHTS} or {SAFE_INDEX}); "
                    "write it with save_pretrained")


def _read_pickled(path: Path) -> dict:
    state = read_weights(path)  # torch.load(weights_only=True): tensors and containers only
    if state is None:
        raise LoadError(f"{path} is not a readable state_dict; save the model again with "
                        "save_pretrained(..., safe_serialization=True)")
    return state


@contextlib.contextmanager
def quiet_transformers(transformers):
    """No progress bars and no warnings from transformers for the block (the library never prints)."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


__all__ = ["is_pretrained", "without_cache", "forward_kwargs", "vocab_size", "example_specs",
           "is_pretrained_folder", "load_pretrained"]
