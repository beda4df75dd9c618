"""Re-render every committed predictor page from its own command: see sdtp/reports/page_check.py.

    PYTHONPATH=. python scripts/check_pages.py   # writes results/page_check.{md,json}; exit 1 if one changed or failed
"""

import sys

from sdtp.reports.page_check import main

if __name__ == "__main__":
    sys.exit(main())
