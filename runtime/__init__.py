"""Everything that runs a compiled model: masks, blocks, the model, generation, interop."""
