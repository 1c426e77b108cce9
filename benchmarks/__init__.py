"""Benchmarks of nni-idarts: ground truth on digits, search quality, cost and hypergradient fidelity (see RESULTS.md)."""
