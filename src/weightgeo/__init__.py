"""weightgeo: the geometry of fine-tuning in parameter space.

(The public API is assembled here; see docs/metrics.md for the naming contract.)
"""

from __future__ import annotations

from .errors import WeightgeoError

__version__ = "0.1.0"

__all__ = ["WeightgeoError", "__version__"]
