"""``python -m hybridize``: the same as the ``hybridize`` console script."""
from hybridize.cli import main

raise SystemExit(main())
