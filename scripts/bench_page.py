"""Regenerate the committed efficiency page results/bench/<model>.{json,md,png}: see sdtp/reports/bench_page.py.

    python scripts/bench_page.py                       # measure (sdtp-bench defaults) and write the page
    python scripts/bench_page.py repeats=3 new_tokens=32   # extra sdtp-bench overrides
    python scripts/bench_page.py --from-run results/runs/bench/<time>   # re-render from an existing run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtp.reports.bench_page import main  # noqa: E402

if __name__ == "__main__":
    main()
