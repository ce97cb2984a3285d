"""What a run reads and writes: checkpoints, the run folder, the train config, where it computes, data,
grids, tokenizer, packing, plots, and atomic writes with checked reads (files.py)."""
