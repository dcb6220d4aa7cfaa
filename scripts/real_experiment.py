"""Run the SmolLM2 experiment with its default settings and re-render docs/real-model.md's table.

    python scripts/real_experiment.py          # writes docs/results/real_report.json (about an hour
                                               # on 2 shared CPU cores: docs/real-model.md, Costs)

Only the defaults (qstar_mini.studies.real_text.RealSettings); ``qstar-mini real`` takes the
settings as flags. Re-render the page from an existing report without running anything:

    python -c "import json; from qstar_mini.studies import real_text as rt; \
rt.update_page('docs/real-model.md', json.load(open('docs/results/real_report.json')))"
"""

from pathlib import Path

import torch

from qstar_mini.studies.real_text import RealSettings, run_experiment, update_page

ROOT = Path(__file__).resolve().parent.parent

torch.set_num_threads(1)
report = run_experiment(RealSettings(), ROOT / "docs" / "results")
update_page(ROOT / "docs" / "real-model.md", report)
