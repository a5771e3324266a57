"""`python -m calray.sweep`: see calray.sweep.runner."""

import sys

from calray.sweep.runner import main

sys.exit(main())
