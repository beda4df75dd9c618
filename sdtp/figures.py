"""Figures on the result pages: made on the headless backend, written atomically, always freed.

Every page that draws a plot goes through these two functions, so none needs a display, none leaves a half-written
PNG beside a finished table when it is killed, and none leaks a figure when drawing fails halfway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtp.utils import atomic_path


def new_figure(*grid: int, **subplots: Any) -> tuple[Any, Any]:
    """``plt.subplots(*grid, **subplots)`` on the Agg backend (pages are rendered on machines without a display).

    Returns (figure, axes) as ``plt.subplots`` does; matplotlib is imported here, not by the modules that only
    compute a page.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*grid, **subplots)


def save_figure(fig: Any, path: str | Path, *, rect: tuple[float, float, float, float] | None = None,
                **savefig: Any) -> Path:
    """Lay ``fig`` out, write it to ``path`` via a temporary file + rename, and close it (also on failure).

    The format follows ``path``'s suffix (the temporary keeps it); ``rect`` is ``tight_layout``'s (room left for
    a legend beside the axes); ``savefig`` goes to ``Figure.savefig`` (e.g. ``dpi``).
    """
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout(**({} if rect is None else {"rect": rect}))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, **savefig)
    finally:
        plt.close(fig)
    return Path(path)
