"""``python -m djinn_nb.serving``: the ``djinn-server`` command."""
import sys

from .cli import main

sys.exit(main())
