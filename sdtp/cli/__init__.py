"""Hydra entry points (``sdtp-*`` console scripts). Each exposes ``run(cfg)`` and ``main()``."""
