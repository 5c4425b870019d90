"""classp_fused: CLASSP as a fused torch.optim optimizer, MAS/EWC baselines, a continual-learning
harness."""
from .backends import available_backends, classp_step_
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import CLASSP
from .regularizers import EWC, MAS, Regularizer

__all__ = ["CLASSP", "EWC", "MAS", "Regularizer", "available_backends", "classp_step_",
           "load_checkpoint", "save_checkpoint"]
__version__ = "0.1.0"
