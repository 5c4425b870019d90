"""``python -m classp_fused``: the ``classp-fused`` command line."""
from .cli import main

raise SystemExit(main())
