"""sdtp's Hydra plugin: the validating sweeper (Hydra loads plugins only from the ``hydra_plugins`` package)."""
