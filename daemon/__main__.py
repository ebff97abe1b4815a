"""``python -m daemon`` is the same as the ``trainingd`` console script."""

from __future__ import annotations

from daemon.cli import main

raise SystemExit(main())
