"""Hydra's Optuna sweeper, refusing a schedule search it cannot vary before the study holds any trial
(``experiment=schedule_search`` sets it as ``hydra.sweeper._target_``).

The plain sweeper asks the study for a trial and only then calls the search-space hook
(:func:`sdtp.search.space.suggest_num_stages`): refused there (:func:`sdtp.search.space.check_searchable`), the sweep
stopped with that trial left RUNNING in the stored study for good, which a resumed search took for an interrupted one.
"""

from __future__ import annotations

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class SearchOptunaSweeper(OptunaSweeper):
    def sweep(self, arguments: list[str]) -> None:
        # Imported here: Hydra imports every plugin module at start-up.
        from sdtp.search.space import check_searchable

        check_searchable(self.sweeper.config)  # the config setup() stored: the one the hook would check
        return super().sweep(arguments)
