"""``python -m app.cli``: the same as the ``cxr-reid`` command."""

from app.cli import main

raise SystemExit(main())
