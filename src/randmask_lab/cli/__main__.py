"""``python -m randmask_lab.cli``: the ``randmask`` command."""

import sys

from randmask_lab.cli.app import main

sys.exit(main())
