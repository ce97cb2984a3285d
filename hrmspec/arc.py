"""ARC evaluation as the official HRM / TRM code does it, under a short name:

    from hrmspec.arc import ArcEvaluator

    evaluator = ArcEvaluator("data/arc-aug-1000")          # identifiers.json, test_puzzles.json
    evaluator.update_batch(batch, {"preds": preds, "q_halt_logits": q_halt_logits})
    metrics = evaluator.result(save_path="out/")           # {"ARC/pass@1": ..., ...} and out/submission.json

The evaluator lives in hrmspec.runtime.evaluate.arc (its docstring describes the voting), the grid
layout, augmentations and hashes in hrmspec.runtime.artifacts.arc_grids. Neither needs torch.
"""

from hrmspec.runtime.artifacts.arc_grids import Augmentation, crop, grid_hash, parse_name
from hrmspec.runtime.evaluate.arc import ArcEvaluator

__all__ = ["ArcEvaluator", "Augmentation", "crop", "grid_hash", "parse_name"]
