"""Vision distillation: losses on class logits (KD, DKD, logit standardization, TTM and their α-β versions)."""
