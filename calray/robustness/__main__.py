"""`python -m calray.robustness`: see calray.robustness.grid."""

import sys

from calray.robustness.grid import main

sys.exit(main())
