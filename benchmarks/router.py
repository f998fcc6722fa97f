"""Thin entry point: `python benchmarks/router.py [--quick] [--shapes ...] [--routing ...] [--out PATH]`.

See moe_engine/bench/router.py for what it measures; `moe-engine bench` runs every benchmark at once.
"""

import sys

from moe_engine.bench.router import main

if __name__ == "__main__":
    sys.exit(main())
