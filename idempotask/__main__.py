"""``python -m idempotask``: the ``idempotask`` command (see :mod:`idempotask.cli`)."""

from __future__ import annotations

import sys

from idempotask.cli import main

if __name__ == "__main__":
    sys.exit(main())
