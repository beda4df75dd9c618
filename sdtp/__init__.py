"""sdtp: Saliency-driven Dynamic Token Pruning for large language models.

Library components are side-effect free; the Hydra entry points live in :mod:`sdtp.cli`.
"""

from sdtp.engine.pruner import TokenPruner
from sdtp.engine.schedule import PruningSchedule
from sdtp.predictor import TokenPredictor

__all__ = ["PruningSchedule", "TokenPredictor", "TokenPruner"]
__version__ = "0.1.0"
