"""Thin entry point: `python benchmarks/moe_layer.py [--quick] [--shapes ...] [--routing ...] [--out PATH]`.

See moe_engine/bench/layer.py for what it measures; `moe-engine bench` runs every benchmark at once.
"""

import sys

from moe_engine.bench.layer import main

if __name__ == "__main__":
    sys.exit(main())
