__version__ = "0.1.0"
from .divergence import align_next_token, mask_from_labels
from .core import ABDivergence, ab_divergence, ab_divergence_from_hidden
from .losses import available, get_loss
