"""What the notebooks and the classroom use around the algorithm: nothing here computes a step.

=============================  ================================================================
module                         holds
=============================  ================================================================
:mod:`.checks`                 the checks of the "build it yourself" exercises (notebooks 02-05)
:mod:`.assignments`            student copies of the notebooks (``qstar-mini assignments``)
:mod:`.explorers`              the ipywidgets explorers (masks, thoughts, generation), each with
                               a static view for where widgets cannot run
:mod:`.plots`                  every plot and the coloured text of the notebooks and reports
=============================  ================================================================

The algorithm never imports this subpackage (``experiments.write_plots`` and the CLI's
``assignments`` command import it lazily), so training needs neither ipywidgets nor nbformat.
Import the modules by name, e.g. ``from qstar_mini.teaching import checks``.
"""
