"""The ModelGraph: the spec's schedule unrolled into a networkx graph, and analyses on it."""

from hrmspec.graph.analysis import GraphStats, analyse
from hrmspec.graph.build import build_graph, call_nodes
from hrmspec.graph.credit_plan import credit_depth, credit_table, grad_flags
from hrmspec.graph.layout import Call, LoopLayout, loop_layout, unroll

__all__ = [
    "Call", "GraphStats", "LoopLayout", "analyse", "build_graph", "call_nodes", "credit_depth", "credit_table",
    "grad_flags", "loop_layout", "unroll",
]
