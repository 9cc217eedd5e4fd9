"""``python -m harness.cli``: the ``blindspots`` command without the installed script."""

import sys

from harness.cli.app import main

sys.exit(main())
