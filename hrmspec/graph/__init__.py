"""The ModelGraph: the spec's schedule unrolled into a networkx graph, and analyses on it."""

from hrmspec.graph.analysis import GraphStats, analyse
from hrmspec.graph.build import build_graph, call_nodes, unroll
from hrmspec.graph.credit_plan import Call, credit_depth, credit_table, grad_flags

__all__ = [
    "Call", "GraphStats", "analyse", "build_graph", "call_nodes", "credit_depth", "credit_table", "grad_flags",
    "unroll",
]
