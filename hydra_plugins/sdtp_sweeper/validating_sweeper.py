"""Hydra's basic sweeper, checking every job's config before the first job runs (``hydra/sweeper=validating``,
the default of every sdtp entry point: ``conf/hydra/default.yaml``).

Hydra composes a sweep's jobs up front (so a typo in a key fails at once), but sdtp's own checks
(:func:`sdtp.config.validate_config`: schedule ranges, dtype, model family, KV policy, seed, ...) run inside each
job, so ``-m pruning.keep_ratio=0.5,2.0`` would run the 0.5 point to the end before refusing 2.0. This sweeper runs
them on every job of a batch (one batch = the whole sweep, by default) before launching it, followed by the entry
point's own pre-run checks (:func:`sdtp.cli.check.entry_validation`: e.g. an eval's lengths or tasks).
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import open_dict


class ValidatingSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        # Imported here: Hydra imports every plugin module at start-up, sdtp.config pulls in transformers.
        from sdtp.cli.check import entry_validation
        from sdtp.config import prepare_and_validate, running_entry
        from sdtp.errors import ConfigError

        entry, prepare = running_entry()
        validate = entry_validation(entry)

        # Not super()'s check as well: it composes every job just as load_sweep_config does here (unknown keys and
        # bad groups fail in it), then discards the config this check needs.
        for index, overrides in enumerate(batch):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            try:
                with open_dict(cfg):
                    prepare_and_validate(cfg, list(overrides), prepare)
                    if validate is not None:
                        validate(cfg)
            except ConfigError as err:
                raise ConfigError(f"sweep job #{index} ({' '.join(overrides)}), before any job ran: {err}") from err
