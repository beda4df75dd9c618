"""Generated, committed reports: each module computes (or reuses cached) numbers and renders a page.

Pages are never hand-edited; re-running the module with the command printed on the page
reproduces it. ``predictor_eval``: a trained SDTP predictor against every training-free scorer
under the continuation protocol (:mod:`sdtp.eval.continuation`); its options, cells and page text are
``predictor_options``, ``continuation_cells`` and ``predictor_page``.
"""
