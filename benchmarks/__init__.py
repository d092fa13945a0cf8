"""Benchmarks of dmattn_cupy against its peers (torch SDPA, FlexAttention).

Entry point: ``python -m benchmarks --suite seed|gqa|decode|sparsity|all [--backward]``.
Modules, one job each:

- :mod:`benchmarks.configs`     the benchmark configurations, mask builders, byte and FLOP counts
- :mod:`benchmarks.timing`      medians, peak memory, device ceilings (copy bandwidth, matmul rate)
- :mod:`benchmarks.peers`       every implementation as a (forward, forward+backward) callable
- :mod:`benchmarks.report`      JSON records -> markdown table and PNG plots
- :mod:`benchmarks.equivalence` CUDA path vs the NumPy reference on many random configurations

Only ``configs`` and ``report`` import without a GPU; the rest import torch/cupy lazily.
"""
