__version__ = "0.1.0"
from .divergence import ABDivergence, ab_divergence, mask_from_labels
from .losses import available, get_loss
