"""`python -m harness …` is `vramlab …` (for a checkout that is not pip-installed)."""

import sys

from .cli import main

sys.exit(main())
