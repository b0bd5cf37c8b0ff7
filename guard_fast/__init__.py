"""guard_fast: fast, distributed GUARD (robust dataset distillation by curvature regularization)."""

__version__ = "0.1.0"
