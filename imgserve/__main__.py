"""``python -m imgserve``: see :mod:`imgserve.cli`."""

from imgserve.cli import main

raise SystemExit(main())
