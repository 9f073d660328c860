"""CLIP base-to-new prompt distillation (PromptKD-style): deep-prompted CLIP teacher and student, the CoOp datasets and splits, the trainer, base/new/HM evaluation."""
