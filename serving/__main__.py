"""``python -m serving ...`` is the ``onebox`` command."""

import sys

from serving.cli import main

sys.exit(main())
