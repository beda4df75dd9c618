"""Schedule search (``experiment=schedule_search``, docs/results.md): what the Hydra Optuna sweeper calls
(:mod:`sdtp.search.space`), what a trial returns (:mod:`sdtp.search.objective`) and the Pareto front of the
trials (:mod:`sdtp.search.pareto`)."""
