"""Vision distillation on CIFAR-100: losses (KD, DKD, logit standardization, TTM and their α-β versions), the model zoo, data, trainer, recipes and experiments."""
