"""How the training loss is cut into row chunks: the rule the chunked linear + cross-entropy driver of
every backend follows (backends/common/chunked_linear_ce.py), and the roofline counts (roofline.py:
each chunk is a GEMM of its own, reading the whole head weight)."""

from __future__ import annotations


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


MIN_CHUNK_ROWS = 64  # fewer rows make each chunk's GEMMs too thin to run at speed (benchmarks/loss_memory.py)


def default_chunk_rows(n_rows: int, vocab: int, d_model: int) -> int:
    """Rows per chunk such that the chunk's logits (C, V) are about as large as h (N, d), but at
    least MIN_CHUNK_ROWS: a (64, V) buffer is small next to anything that trains at such a V."""
    per_row = -(-vocab // max(1, d_model))
    return max(1, min(n_rows, max(MIN_CHUNK_ROWS, next_power_of_2(-(-n_rows // per_row)))))


__all__ = ["MIN_CHUNK_ROWS", "default_chunk_rows", "next_power_of_2"]
