"""The roofline of a training step: per kernel of the fusion plan, its FLOPs, the bytes it moves, its
arithmetic intensity, and the time a GPU's published peaks allow it (hrmspec/gpus.py).

A kernel runs no faster than its FLOPs at the peak FLOP/s of the units it uses, nor than its bytes
at the HBM bandwidth: time = max(FLOPs / peak, bytes / bandwidth). It is compute-bound when the
first is larger, i.e. when its intensity (FLOPs per byte) exceeds the GPU's ridge (peak /
bandwidth). Matmuls and attention run on the tensor cores (the bf16 peak with 2-byte elements),
row kernels on the fp32 CUDA cores (they compute in fp32 after load).

One step is B x S = T tokens, every op one launch over the batch. What each kernel costs (its
bytes are the least it must move: every tensor read or written once, at `dtype_bytes` per element):

    matmul (linear op)   FLOPs 2 T in out;  bytes (T in + T out + in out [+ bias]) elements
    attention            FLOPs 4 heads head_dim keys(S) per token (as analysis.py counts them);
                         bytes: q, k, v read and the output written once (flash attention)
    row region           per row of its domain, its RowProgram's ops (an elementwise op or a
                         reduction: width FLOPs; a per-row scalar op: 1) and its tensors (row inputs
                         and outputs; weight vectors once per launch; a weight gradient's per-row
                         partials in fp32, written and read back by their sum over rows)
    backward             a row region: its backward program (hrmspec.ir.grad of the forward);
                         a matmul or attention: twice the forward's FLOPs and bytes (dX and dW;
                         dQ, dK and dV), as analysis.py's "3x a training step" counts them
    head + loss          the chunked linear + cross-entropy (loss_chunks.py): per chunk of C rows a
                         GEMM reading all of W and writing the (C, V) logits, and a softmax step on
                         them; the backward recomputes the logits (three GEMMs per chunk)
    optimizer            per fp32 parameter: AdamATan2 reads p, g, m, v and writes p, m, v; the
                         gradient clip reads g twice and writes it; the EMA reads p and the shadow
                         and writes the shadow: 13 x 4 bytes; its arithmetic is left out

Calls outside the credit plan run forward only; grad calls forward and backward. Left out: the
embedding lookup and its gradient, halting heads, launch overheads and reuse through caches.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import networkx as nx

from hrmspec.gpus import GPU
from hrmspec.graph.analysis import analyse, attended, loop_steps
from hrmspec.graph.body import Body, Op
from hrmspec.graph.build import call_nodes
from hrmspec.graph.fusion import call_arities, final_norm_op, fuse_model, op_bytes
from hrmspec.graph.loss_chunks import default_chunk_rows
from hrmspec.ir import RowProgram
from hrmspec.ir.kernel import backward_program, kernel_name
from hrmspec.ir.opset import LEAF, REDUCE

OPTIMIZER_BYTES_PER_PARAM = 13 * 4  # see the module docstring


@dataclass
class KernelCost:
    """One kernel of a training step, the same in every launch."""

    name: str  # where it runs and what it computes: "L: attn.qkvg", "L: attn_residual + mlp_norm"
    kind: str  # matmul | attention | row | copy | optimizer
    direction: str  # fwd | bwd | update
    flops: float  # per launch
    bytes: float  # per launch
    tensor_cores: bool  # matmul and attention
    launches: int = 0  # per training step
    kernel: str = ""  # a row region's generated kernel

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else math.inf


@dataclass
class KernelTime:
    cost: KernelCost
    time: float  # seconds per launch
    bound: str  # compute | memory

    @property
    def step_time(self) -> float:
        return self.time * self.cost.launches


@dataclass
class Roofline:
    gpu: GPU
    batch: int
    seq_len: int
    dtype_bytes: int
    model_flops: float  # per step: analysis.py's training-step FLOPs (matmuls and attention) x tokens
    kernels: list[KernelTime] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def time(self, direction: str) -> float:
        return sum(k.step_time for k in self.kernels if k.cost.direction == direction)

    @property
    def step_time(self) -> float:
        return sum(k.step_time for k in self.kernels)

    @property
    def mfu(self) -> float:
        """Model FLOPs per second at the predicted step time, as a fraction of the matmul peak."""
        return self.model_flops / self.step_time / self.gpu.peak_flops(True, self.dtype_bytes)

    def as_dict(self) -> dict:
        """Everything the table shows, in SI units (seconds, bytes, FLOPs): what `--json` prints."""
        step = self.step_time
        return {
            "gpu": asdict(self.gpu), "batch": self.batch, "seq_len": self.seq_len, "tokens": self.tokens,
            "dtype_bytes": self.dtype_bytes,
            "kernels": [{**asdict(k.cost), "intensity": k.cost.intensity, "bound": k.bound, "time": k.time,
                         "step_time": k.step_time} for k in self.kernels],
            "forward_time": self.time("fwd"), "backward_time": self.time("bwd"), "optimizer_time": self.time("update"),
            "step_time": step, "tokens_per_s": self.tokens / step, "model_flops": self.model_flops, "mfu": self.mfu,
        }


def kernel_time(cost: KernelCost, gpu: GPU, dtype_bytes: int = 2) -> KernelTime:
    """A kernel's time per launch on `gpu` and what bounds it."""
    compute = cost.flops / gpu.peak_flops(cost.tensor_cores, dtype_bytes)
    memory = cost.bytes / gpu.bandwidth
    return KernelTime(cost, max(compute, memory), "compute" if compute > memory else "memory")


def roofline(G: nx.DiGraph, gpu: GPU, batch: int = 1, seq_len: int = 2048, dtype_bytes: int = 2) -> Roofline:
    """The roofline of one training step of `batch` rows of `seq_len` tokens on `gpu`."""
    costs = kernel_costs(G, batch, seq_len, dtype_bytes)
    stats = analyse(G, seq_len=seq_len, dtype_bytes=dtype_bytes)
    return Roofline(gpu, batch, seq_len, dtype_bytes, stats.train_flops_per_token * batch * seq_len,
                    [kernel_time(c, gpu, dtype_bytes) for c in costs if c.launches])


# --------------------------------------------------------------------------- what each kernel costs


def row_cost(program: RowProgram, width: int, dtype_bytes: int = 2) -> tuple[float, float, float]:
    """(FLOPs per row, bytes per row, bytes per launch) of a row kernel over rows of `width`."""
    flops = 0.0
    for n in program.nodes:
        if n.op in LEAF or n.op == "cast":
            continue
        flops += width if n.op in REDUCE or n.kind in ("row", "vector") else 1
    per_row = once = 0.0
    for i in program.inputs:
        if i.kind == "vector":
            once += width * dtype_bytes
        else:
            per_row += (width if i.kind == "row" else 1) * dtype_bytes
    for o in program.outputs:
        if o.row_partial:  # fp32, written by the kernel and read back by the sum over rows
            per_row += 2 * width * 4
        else:
            per_row += (width if o.kind == "row" else 1) * dtype_bytes
    return flops, per_row, once


def _row_kernel(name: str, program: RowProgram, domain: tuple[int, int], tokens: int, direction: str,
                dtype_bytes: int) -> KernelCost:
    rows = tokens * domain[0]
    flops, per_row, once = row_cost(program, domain[1], dtype_bytes)
    kernel = kernel_name(program, direction, program.name if direction == "bwd" else None)
    return KernelCost(name, "row", direction, flops * rows, per_row * rows + once, False, kernel=kernel)


def op_costs(body: Body, op: Op, name: str, tokens: int, seq_len: int, dtype_bytes: int) -> list[KernelCost]:
    """The forward kernel of one op of a (fused) body over `tokens` tokens, and its backward."""
    T = tokens
    if op.program is not None:  # a row region (or RoPE)
        return [_row_kernel(name, op.program, op.domain, T, "fwd", dtype_bytes),
                _row_kernel(name, backward_program(op.program), op.domain, T, "bwd", dtype_bytes)]
    if op.kind == "linear":
        n_in = body.tensors[op.reads[0]].size
        n_out = sum(body.tensors[t].size for t in op.writes)
        moved = dtype_bytes * (T * (n_in + n_out) + op.param_count)
        fwd = KernelCost(name, "matmul", "fwd", float(op.flops * T), float(moved), True)
    elif op.kind == "attention":
        keys = attended(op.attrs["mask"], seq_len)
        fwd = KernelCost(name, "attention", "fwd", 4.0 * op.attrs["heads"] * op.attrs["head_dim"] * keys * T,
                         float(op_bytes(body, op, dtype_bytes) * T), True)
    else:  # a layout change (a token MLP's transpose): bytes only
        fwd = KernelCost(name, "copy", "fwd", 0.0, float(op_bytes(body, op, dtype_bytes) * T), False)
    bwd = KernelCost(name, fwd.kind, "bwd", 2 * fwd.flops, 2 * fwd.bytes, fwd.tensor_cores)
    return [fwd, bwd]


def head_costs(d: int, vocab: int, tokens: int, dtype_bytes: int) -> list[KernelCost]:
    """The chunked linear + cross-entropy over `tokens` rows: per chunk, forward and backward kernels (a
    launch covers the mean rows of a chunk, so that the launches add up to the tokens, a last partial
    chunk included)."""
    chunks = -(-tokens // default_chunk_rows(tokens, vocab, d))
    C = tokens / chunks
    gemm = 2.0 * C * d * vocab, dtype_bytes * (C * d + vocab * d + C * vocab)
    softmax = 4.0 * C * vocab, dtype_bytes * C * vocab + 16 * C  # max, subtract, exp, sum; lse and loss out
    soft_bwd = 3.0 * C * vocab, 2 * dtype_bytes * C * vocab + 16 * C  # dz = g (softmax - onehot), in place
    return [KernelCost("head + loss: logits", "matmul", "fwd", *gemm, True, chunks),
            KernelCost("head + loss: softmax", "row", "fwd", *softmax, False, chunks),
            KernelCost("head + loss: logits (recomputed), dh, dW", "matmul", "bwd", *gemm, True, 3 * chunks),
            KernelCost("head + loss: softmax", "row", "bwd", *soft_bwd, False, chunks)]


def _what(op: Op) -> str:
    """What an op computes in any layer: its name (a region: its members) without the layer index."""
    return " + ".join(re.sub(r"^\d+\.", "", m) for m in (op.members or (op.name,)))


def kernel_costs(G: nx.DiGraph, batch: int = 1, seq_len: int = 2048, dtype_bytes: int = 2) -> list[KernelCost]:
    """Every kernel of one training step of `batch` x `seq_len` tokens with its launches: the forward
    kernels of every module call, the head and loss, the backward kernels of the grad calls, the optimizer.
    The same op in every layer of a module is one kernel launched once per layer and call."""
    spec = G.graph["spec"]
    model = spec.model
    T = batch * seq_len
    plan = fuse_model(G, dtype_bytes)
    runs = call_arities(G)
    grads: dict[tuple[str, int], int] = defaultdict(int)
    for call, node in zip(G.graph["calls"], call_nodes(G)):
        grads[(call.module, len(call.inputs))] += bool(node["grad"])
    arities = defaultdict(set)
    for mod, k in plan.bodies:
        arities[mod].add(k)
    found: dict[tuple[str, str], KernelCost] = {}
    for (mod, k), body in plan.bodies.items():
        tag = mod if len(arities[mod]) == 1 else f"{mod} (on a sum of {k})"
        for op in body.ops:
            for cost in op_costs(body, op, f"{tag}: {_what(op)}", T, seq_len, dtype_bytes):
                mine = found.setdefault((cost.name, cost.direction), cost)
                mine.launches += runs[(mod, k)] if cost.direction == "fwd" else grads[(mod, k)]
    _, scored = loop_steps(G)
    tail = []
    final = final_norm_op(model)
    if final is not None:
        for cost in op_costs(Body("", 1, ("h",), "y", (final,), {}), final, "final_norm", T, seq_len, dtype_bytes):
            cost.launches = scored
            tail.append(cost)
    for cost in head_costs(model.d_model, model.vocab, T, dtype_bytes):
        cost.launches *= scored
        tail.append(cost)
    costs = [c for c in found.values() if c.direction == "fwd"] + [c for c in tail if c.direction == "fwd"]
    costs += [c for c in tail if c.direction == "bwd"] + [c for c in found.values() if c.direction == "bwd"]
    params = analyse(G).params
    return costs + [KernelCost("optimizer, gradient clip, EMA (fp32)", "optimizer", "update", 0.0,
                               float(OPTIMIZER_BYTES_PER_PARAM * params), False, 1)]


__all__ = ["OPTIMIZER_BYTES_PER_PARAM", "KernelCost", "KernelTime", "Roofline", "head_costs", "kernel_costs",
           "kernel_time", "op_costs", "roofline", "row_cost"]
