"""The one exception weightgeo raises for bad input."""

from __future__ import annotations

__all__ = ["WeightgeoError"]


class WeightgeoError(ValueError):
    """Bad input: the message names the file or tensor, what was found, and the fix.

    It subclasses :class:`ValueError` so that code catching ``ValueError`` keeps working.

    >>> raise WeightgeoError("tensor 'layers.0.q_proj.weight': shapes (4, 8) vs (4, 9); compare checkpoints of one architecture")
    Traceback (most recent call last):
    ...
    weightgeo.errors.WeightgeoError: tensor 'layers.0.q_proj.weight': shapes (4, 8) vs (4, 9); compare checkpoints of one architecture
    """
