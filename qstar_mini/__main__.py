"""``python -m qstar_mini ...`` is the same as the ``qstar-mini`` command."""

from qstar_mini.cli import main

raise SystemExit(main())
