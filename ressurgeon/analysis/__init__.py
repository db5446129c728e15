"""Read-only graph analysis: dominators, merges of branches, and the layer tree."""

from .blocks import Merge, Residual, find_merges
from .dominators import DominatorTree
from .layers import GraphAnalysis, Layer, analyze_graph, find_layers, find_residuals

__all__ = ["DominatorTree", "Merge", "Residual", "find_merges", "GraphAnalysis", "Layer",
           "analyze_graph", "find_layers", "find_residuals"]
