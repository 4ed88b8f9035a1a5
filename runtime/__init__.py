"""vlm2vla-edge runtime: the on-robot package (no torch).

The model speaks robot actions as text; this package turns that text into typed commands, bounds
them with the safety limiter, and drives an arm (real or simulated).
"""

__version__ = "0.1.0"
