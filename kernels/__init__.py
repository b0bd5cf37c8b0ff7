"""Fused GPU kernels (Triton) with pure-torch references; one file per op."""
