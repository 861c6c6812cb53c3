"""``python -m bge_ray ...``: the ``bge-ray`` command where its script is not on the PATH (a
``pip install --target`` or ``PYTHONPATH`` install)."""

import sys

from bge_ray.cli import main

sys.exit(main())
