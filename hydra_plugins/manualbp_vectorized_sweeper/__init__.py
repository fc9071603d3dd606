"""Hydra sweeper ``hydra/sweeper=vectorized``: see :mod:`.vectorized_sweeper`."""
