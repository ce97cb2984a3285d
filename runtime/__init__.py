"""Everything that runs a compiled model, in layers that import only downward (tests/test_imports.py):

    execution/   CompiledModel, its driver, module stacks, the per-batch context, generation, depth policies
    artifacts/   what a run reads and writes: checkpoints, run folders, train config, placement, data,
                 grids, tokenizer, packing, plots, atomic files
    evaluate/    held-out evaluation, adaptive depth against full depth, the lm-evaluation-harness model
    interop/     Hugging Face `hrm_text`, Huginn and official HRM / TRM checkpoints in and out (beside evaluate/)
    training/    the trainer, one training step, objectives, optimizers, recurrence curricula, compare

The commands that drive them live in hrmspec/cli/.
"""
