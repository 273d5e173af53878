"""`python -m edge_agent ...` == `edge-agent ...`."""

import sys

from .cli import main

sys.exit(main())
