"""Dominators of an fx dataflow graph, computed once, queried in O(1).

u dominates v when every path from the model's inputs to v passes through u.
fx graphs are DAGs in topological order, so one pass of Cooper, Harvey and
Kennedy's "intersect" over the predecessors is exact: every predecessor's
immediate dominator is final before the node is reached.

A recurrent layer's initial state (h0, c0: ``Trait.STATE_INPUT`` in the
registry) is no path either: it is a side input, like a bias, so the layers
of a stack fed the caller's h0 still form a chain.

Edges that carry no tensor (``x.shape``, ``x.size(0)``, an optional input
left at None; marked by shape propagation) are left out: they pass no
activation, so ``x.view(x.size(0), -1)`` depends on ``x`` alone and a reshape
inside attention is no join of branches.
"""

from __future__ import annotations

from torch import fx

from .._fx import has_data
from ..registry import Trait, has_trait

_ROOT = None  # virtual entry joined to every placeholder


class DominatorTree:
    """Immediate dominators of the input-dependent nodes of ``graph``.

    Nodes that do not depend on any input (get_attr, constants) are not on a
    path from the input and take no part; neither do nodes that depend on the
    input only through values that hold no tensor (sizes, None).

    Example:
        >>> tree = DominatorTree(gm.graph)             # doctest: +SKIP
        >>> tree.dominates(conv1_node, relu3_node)     # doctest: +SKIP
        True
    """

    def __init__(self, graph: fx.Graph, modules: dict | None = None):
        self.index: dict[fx.Node, int] = {}
        self.idom: dict[fx.Node, fx.Node | None] = {}
        self.preds: dict[fx.Node, list[fx.Node]] = {}  # the edges followed, for regions
        for node in graph.nodes:
            if node.op == "placeholder":
                self._add(node, _ROOT)
                continue
            inputs = node.all_input_nodes
            if modules is not None and node.args and isinstance(node.args[0], fx.Node) \
                    and has_trait(node, modules, Trait.STATE_INPUT):
                inputs = [node.args[0]]
            preds = [a for a in inputs if a in self.index and has_data(a)]
            self.preds[node] = preds
            if not preds:
                continue
            dom = preds[0]
            for p in preds[1:]:
                dom = self._intersect(dom, p)
            self._add(node, dom)
        self._number()

    def _add(self, node: fx.Node, idom: fx.Node | None) -> None:
        self.index[node] = len(self.index)
        self.idom[node] = idom

    def _intersect(self, a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        index = self.index
        while a is not b:
            if a is _ROOT or b is _ROOT:
                return _ROOT
            while a is not _ROOT and b is not _ROOT and index[a] > index[b]:
                a = self.idom[a]
            while a is not _ROOT and b is not _ROOT and index[b] > index[a]:
                b = self.idom[b]
        return a

    def _number(self) -> None:
        # Pre/post numbers of a DFS over the tree give O(1) ancestry tests;
        # iterative, because a 1,000-layer chain is a 3,000-deep tree.
        children: dict[fx.Node | None, list[fx.Node]] = {}
        for node, parent in self.idom.items():
            children.setdefault(parent, []).append(node)
        self.pre: dict[fx.Node, int] = {}
        self.post: dict[fx.Node, int] = {}
        clock = 0
        stack: list[tuple[fx.Node | None, bool]] = [(_ROOT, False)]
        while stack:
            node, done = stack.pop()
            if done:
                if node is not _ROOT:
                    self.post[node] = clock
                clock += 1
                continue
            if node is not _ROOT:
                self.pre[node] = clock
            clock += 1
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(children.get(node, ())))

    def __contains__(self, node: fx.Node) -> bool:
        return node in self.index

    def dominates(self, u: fx.Node, v: fx.Node) -> bool:
        """True when every path from the inputs to v passes through u (u dominates itself)."""
        if u not in self.pre or v not in self.pre:
            return False
        return self.pre[u] <= self.pre[v] and self.post[v] <= self.post[u]

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """The inputs of ``node`` that the tree follows (tensors with data, no recurrent state)."""
        return self.preds.get(node, [])

    def parent(self, node: fx.Node) -> fx.Node | None:
        return self.idom.get(node)
