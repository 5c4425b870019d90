"""classp_fused: CLASSP as a fused torch.optim optimizer, MAS/EWC baselines, a continual-learning harness."""
from .backends import available_backends, classp_step_
from .optim import CLASSP
from .regularizers import EWC, MAS, Regularizer

__all__ = ["CLASSP", "EWC", "MAS", "Regularizer", "available_backends", "classp_step_"]
__version__ = "0.1.0"
