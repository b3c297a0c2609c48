"""`python -m h2kctl`: the same as the h2kctl program."""

import sys

from h2kctl.cli import main

sys.exit(main())
