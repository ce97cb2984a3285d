"""Everything that runs a compiled model: blocks, the model, generation, interop."""
