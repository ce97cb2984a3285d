"""Everything that runs a compiled model, in three parts:

    execution/   CompiledModel, its module stacks, the per-batch context, generation with a KV cache
    training/    the training loop and what it reads and writes: data, packing, tokenizer, optimizers,
                 checkpoints, held-out evaluation, plots, the train / eval / generate / plot commands
    interop/     Hugging Face `hrm_text` checkpoints in and out, and hrmspec's own checkpoint format

`files.py` (atomic writes, checked reads of safetensors and JSON) serves training and interop.
"""
