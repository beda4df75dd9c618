"""Render the method comparison page from sweep outputs: see sdtp/reports/compare_methods.py.

    python scripts/compare_methods.py [--root results/multiruns] [--out results/compare]
    python scripts/compare_methods.py --smaller-out results/compare_smoke   # a smaller pass never clobbers the page
    python scripts/compare_methods.py --replace                             # overwrite on purpose
"""

from sdtp.reports.compare_methods import main

if __name__ == "__main__":
    raise SystemExit(main())
