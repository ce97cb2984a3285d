"""What the backends share; a backend package imports only this package and hrmspec's core.

    contract.py           the OpTable protocol the runtime calls, and TableBase (the named row ops)
    kernel_table.py       KernelTable: row ops as generated kernels, the rest on the reference table
    fallback.py           fallbacks: a warning once, and `record_fallbacks()` for every call
    rowops.py             the differentiable row op (RowOp, RowFunction, RopeFunction)
    rowlayout.py          how a row kernel finds its rows: two strides per row tensor
    limits.py             what row kernels can take: widths, storage types
    source_cache.py       generated source in content-addressed, checksummed files
    expr_printer.py       the printer base: expressions from a per-language table
    chunked_linear_ce.py  linear + cross-entropy in row chunks, with the row steps given

Importing this package imports none of them (nor torch).
"""
