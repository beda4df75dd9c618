"""sdtp: Saliency-driven Dynamic Token Pruning for large language models.

Library components are side-effect free; the Hydra entry points live in :mod:`sdtp.cli`.
"""

from sdtp.lazy import lazy_exports

__all__ = ["PruningSchedule", "TokenPredictor", "TokenPruner"]
__version__ = "0.1.0"
__getattr__ = lazy_exports(__name__, {"PruningSchedule": "sdtp.engine.schedule", "TokenPredictor": "sdtp.predictor",
                                      "TokenPruner": "sdtp.engine.pruner"})
