"""``python -m frozenlens.cli ...``: the ``frozenlens`` command without its console script."""

import sys

from frozenlens.cli import main

sys.exit(main())
