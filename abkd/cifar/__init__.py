"""CIFAR-100 teacher→student distillation: the model zoo, data, trainer, recipes and experiments (the losses are `abkd.vision_losses`)."""
