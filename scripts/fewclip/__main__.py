"""``python -m fewclip ...``: the ``fewclip`` command."""

from fewclip.cli import main

raise SystemExit(main())
