"""Paired comparison of generation runs from their predictions.jsonl: see sdtp/reports/generation_pairs.py."""

from sdtp.reports.generation_pairs import main

if __name__ == "__main__":
    main()
