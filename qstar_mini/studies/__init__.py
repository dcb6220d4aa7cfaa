"""Studies built on the package: the miniature reproduction, the bench, the real-model experiment.

Each is started by a ``qstar-mini`` subcommand (``reproduce``, ``bench``, ``real``) and writes its
report under ``runs/``; the figures it produced are kept in ``docs/results/``.
"""
