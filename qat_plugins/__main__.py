"""``python -m qat_plugins`` = the ``qat-plugins`` command."""

import sys

from .cli import main

sys.exit(main())
