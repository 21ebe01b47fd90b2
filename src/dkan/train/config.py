"""The public home of :class:`DKANConfig` and :data:`PRESETS` (defined in :mod:`dkan._config`, the ground layer).

They live in the ground so that :mod:`dkan.nn` can read a configuration without importing :mod:`dkan.train`.
"""

from dkan._config import PRESETS as _PRESETS
from dkan._config import DKANConfig

__all__ = ["PRESETS", "DKANConfig"]

#: Named configurations: ``small`` (default, CPU friendly) and the authors' ``her2st``, ``stnet``, ``cscc``.
PRESETS = _PRESETS
