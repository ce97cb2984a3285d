"""Training a compiled spec on instruction-response pairs, and what the loop reads and writes."""
