"""The built-in demo: ``python -m resta_fast demo`` reproduces RESTA's effect on tiny models.

world.py builds the synthetic world, train.py the models and training stages,
run.py patches and evaluates through the public API, report.py writes the reports.
This module imports nothing heavy, so ``--help`` stays fast.
"""

DEFAULT_SEED = 0
