"""``python -m streamq``: the ``streamq`` command."""

import sys

from streamq.cli import main

sys.exit(main())
