"""`python -m phi3`: the same as the `phi3` command."""

import sys

from phi3.cli import main

sys.exit(main())
