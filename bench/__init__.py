"""Benchmarks: side-by-side measurements written as JSON + Markdown (+ PNG) into bench/results/."""
