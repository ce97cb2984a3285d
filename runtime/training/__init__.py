"""Training a compiled spec: the trainer over one training step, the objectives, optimizers,
recurrence curricula, and compare (several specs trained and evaluated at a matched budget)."""
