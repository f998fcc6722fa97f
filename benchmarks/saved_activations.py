"""Thin entry point: `python benchmarks/saved_activations.py [--shapes ...] [--out PATH]` (CPU, no GPU needed).

What each MoE layer path keeps for its backward at the benchmark's shapes, traced under FakeTensorMode;
see moe_engine/bench/saved.py.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the Triton path is traced on CPU

from moe_engine.bench.saved import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
