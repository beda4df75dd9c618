"""sdtp's Hydra plugins: the validating sweeper and the schedule search's Optuna sweeper (Hydra loads plugins only
from the ``hydra_plugins`` package)."""
