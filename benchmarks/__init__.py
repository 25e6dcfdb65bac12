"""Benchmarks of d2pruner_kernels against its peers and the hardware floor (README.md, "Speed").

    pytest benchmarks/ --benchmark-only      per-stage and end-to-end timings
    python -m benchmarks.report [--quick]    one markdown table with the floor
"""
