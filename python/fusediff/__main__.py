"""``python -m fusediff`` runs the ``fusediff`` command (see :mod:`fusediff.cli`)."""

import sys

from .cli import main

sys.exit(main())
