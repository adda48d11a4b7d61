"""``python -m dcris`` is the ``dcris`` command."""

import sys

from dcris.cli import main

sys.exit(main())
