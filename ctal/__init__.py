"""ctal: Cross-Task Affinity Learning (CTAL / EMA-Net) for multitask dense prediction."""
from . import ops
from .nn import CrossTaskAffinity

__version__ = "0.1.0"
__all__ = ["ops", "CrossTaskAffinity", "__version__"]
