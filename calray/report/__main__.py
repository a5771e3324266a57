"""`python -m calray.report`: see calray.report.render."""

import sys

from calray.report.render import main

sys.exit(main())
