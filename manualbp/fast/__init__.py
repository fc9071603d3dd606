"""Fast training paths built on the same formulas as the module (``manualbp.functional``).

- :class:`FusedTrainer`: one model, engine-free forward + hand-derived backward + in-place SGD update.
- :class:`VectorizedTrainer`: K models sharing architecture, trained as one batched model.
"""

from .fused import FusedTrainer
from .vectorized import VectorizedTrainer

__all__ = ["FusedTrainer", "VectorizedTrainer"]
