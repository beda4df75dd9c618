"""Rewrite machine-specific absolute paths in committed results: see sdtp/reports/portable_results.py.

    python scripts/portable_paths.py            # rewrite results/ in place (idempotent; re-run after new results land)
    python scripts/portable_paths.py --check    # list file:line: path offenders, exit 1 if any
"""

import sys

from sdtp.reports.portable_results import main

if __name__ == "__main__":
    sys.exit(main())
