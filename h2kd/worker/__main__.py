"""`python -m h2kd.worker`: the same as the h2k-worker program."""

import sys

from h2kd.worker.main import main

sys.exit(main())
