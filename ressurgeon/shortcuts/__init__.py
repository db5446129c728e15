"""The shortcut modules the rewrite inserts, and the one recogniser for them in any graph.

A shortcut joins a span's output ``h`` with its input ``x``. Each kind of join
is one class that owns its algebra: ``forward``, ``formula`` (the text reports
print), ``terms()`` for joins that are sums of scaled terms (fold rewrites
those), and ``from_inlined`` (how to recognise it after torch.export inlined it
into plain ops). Every other stage (fold, the gate report, diagnostics, plots)
asks the module instead of re-deriving it.

- ``Shortcut`` (``add.py``): the addition join of ResNet and Transformer sublayers;
- ``HighwayShortcut`` (``highway.py``): a learned transform gate, Highway networks;
- ``ConcatJoin`` (``concat.py``): DenseNet's concatenation into a widened next layer.

``find_shortcuts(gm)`` finds our shortcuts as module calls and as the plain
ops torch.export inlines them into (recognised by the ``nn_module_stack`` it
records); ``lift_shortcuts(gm)`` turns inlined ones back into module calls,
so a model read back from a ``.pt2`` trains and folds like the one add_skips
returned.

A join is one class (a ``JoinModule``, ``base.py``) in one file, registered
in ``ressurgeon.catalog.JOINS``; every stage asks the class (see ``base.py``
for the protocol). A join registered by a user's code is recognised here like
the built-in ones, after export too, by the class path torch.export records.
"""

from __future__ import annotations

import torch  # noqa: F401  (the join classes' docstring examples run in this namespace)
import torch.nn as nn
from torch import fx

from .._fx import node_order
from ..catalog import JOINS
from ._graph import ShortcutSite, build_projection
from .add import Shortcut, Term
from .base import JoinModule
from .concat import ConcatJoin
from .highway import HighwayShortcut

BUILT_IN: tuple[type[JoinModule], ...] = (Shortcut, HighwayShortcut, ConcatJoin)
for _cls in BUILT_IN:
    _cls.__module__ = __name__  # one public home, whatever file defines it (pickles, .pt2)


_loaded: dict[tuple, dict[str, type[JoinModule]]] = {}


def join_classes() -> dict[str, type[JoinModule]]:
    """Every registered join's class, by the qualified name torch.export records for it."""
    key = tuple((name, entry.target) for name, entry in JOINS.items())
    if key not in _loaded:  # the catalog changed (a join registered): load its classes
        _loaded.clear()
        found = {}
        for entry in list(JOINS.values()):
            cls = entry.load()
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        _loaded[key] = found
    return _loaded[key]


def __getattr__(name: str):
    # the tables of the previous release, now read from the catalog at each use
    if name == "SHORTCUT_TYPES":
        return join_classes()
    if name == "JOIN_CLASSES":
        return tuple(join_classes().values())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shortcut_type(cls) -> type[JoinModule] | None:
    """Our join class for a class or the qualified name torch.export records; else None."""
    if isinstance(cls, type):
        return cls if issubclass(cls, JoinModule) and cls.join_name in JOINS else None
    return join_classes().get(cls) if isinstance(cls, str) else None


def is_shortcut(module: object) -> bool:
    """A module of a registered join (what add_skips inserts)."""
    return isinstance(module, JoinModule) and type(module).join_name in JOINS


def exported_shortcut_path(node: fx.Node) -> str | None:
    """The shortcut module path an inlined (torch.export'ed) fx node came from, if any.

    torch.export flattens shortcut modules into plain ops but records the
    module stack in ``node.meta["nn_module_stack"]``; the innermost shortcut
    on it is the one the node belongs to.
    """
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if shortcut_type(cls) is not None:
            return path
    return None


def find_shortcuts(gm: fx.GraphModule) -> list[ShortcutSite]:
    """Every shortcut of ours in ``gm``, module calls and torch.export-inlined ones, in graph order.

    Args:
        gm: any GraphModule (from add_skips, trace_model, or a loaded ``.pt2``).

    Returns:
        One ShortcutSite per shortcut; ``gm`` is not modified.

    Example:
        >>> [s.path for s in find_shortcuts(add_skips(model, (x,)).module)]  # doctest: +SKIP
        ['skip_0__4', 'skip_4__8']
    """
    modules = dict(gm.named_modules())
    sites: list[ShortcutSite] = []
    groups: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if module is not None and is_shortcut(module):
            if len(node.args) == 2:
                sites.append(ShortcutSite(path=str(node.target), module=module, node=node,
                                          h=node.args[0], x=node.args[1]))
            continue
        path = exported_shortcut_path(node)
        if path is not None:
            groups.setdefault(path, []).append(node)
    for path, nodes in groups.items():
        cls = shortcut_type(_innermost_class(nodes[0], path))
        for a in {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"}:
            nodes.append(a)  # the group's parameters, for the recogniser
        site = cls.from_inlined(gm, path, nodes) if cls is not None else None
        if site is not None:
            sites.append(site)
    order = node_order(gm.graph)
    return sorted(sites, key=lambda s: order[s.node])


def _innermost_class(node: fx.Node, path: str):
    for p, cls in (node.meta.get("nn_module_stack") or {}).values():
        if p == path:
            return cls
    return None


def lift_shortcuts(gm: fx.GraphModule) -> int:
    """Turn torch.export-inlined shortcuts back into module calls; return how many.

    Each shortcut becomes a call of its module again at its old path, holding
    the very same parameters, so gates keep their names (``skip_*.gate``) and
    the model trains and folds like the one add_skips returned.
    """
    lifted = 0
    for site in find_shortcuts(gm):
        if not site.inlined:
            continue
        gm.add_submodule(site.path, site.module)
        with gm.graph.inserting_after(site.node):
            call = gm.graph.call_module(site.path, (site.h, site.x))
        call.meta = dict(site.node.meta)
        site.node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
        lifted += 1
    if lifted:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return lifted


__all__ = ["JoinModule", "Shortcut", "HighwayShortcut", "ConcatJoin", "Term", "ShortcutSite",
           "find_shortcuts", "lift_shortcuts", "build_projection", "exported_shortcut_path",
           "is_shortcut", "shortcut_type", "join_classes", "BUILT_IN"]
