"""Committed evaluation of a trained predictor vs every training-free scorer: see sdtp/reports/predictor_eval.py.

    PYTHONPATH=. python scripts/predictor_report.py --threads 1 --only dense,random,norm,positional,lazyllm
    PYTHONPATH=. python scripts/predictor_report.py --threads 1 --predictor sdtp=results/predictors/smollm2-135m
"""

from sdtp.reports.predictor_eval import main

if __name__ == "__main__":
    main()
