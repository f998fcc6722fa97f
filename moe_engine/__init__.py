"""moe_engine: Mixture-of-Experts training for generalist multi-task models."""

__version__ = "0.1.0"
