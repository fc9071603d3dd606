"""manualbp: hand-derived backpropagation for PyTorch, checked against autograd and finite differences.

The MLP's forward and backward are a custom ``torch.autograd.Function`` whose backward is the two-pass
algorithm of the notes, written by hand in ``manualbp.functional``.
"""

from . import functional
from .nn import MLP, CrossEntropyLoss, Linear, MSELoss, SquaredErrorLoss
from .registry import register_activation, register_loss

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "Linear",
    "CrossEntropyLoss",
    "MSELoss",
    "SquaredErrorLoss",
    "functional",
    "register_activation",
    "register_loss",
    "__version__",
]
