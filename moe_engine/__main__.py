"""`python -m moe_engine ...` is `moe-engine ...`."""

from moe_engine.cli import main

raise SystemExit(main())
