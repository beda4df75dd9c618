"""Collect the eval runs of scripts/eval_smollm2.sh into results/eval/: see sdtp/reports/eval_report.py.

    python scripts/eval_report.py [--model smollm2-135m] [--limit 10] [--ppl-tokens 4096]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdtp.reports.eval_report import main  # noqa: E402

if __name__ == "__main__":
    main()
