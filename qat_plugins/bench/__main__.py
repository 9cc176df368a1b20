"""``python -m qat_plugins.bench [ARGS]`` (same as ``qat-plugins bench [ARGS]``)."""

import sys

from .main import main

sys.exit(main())
