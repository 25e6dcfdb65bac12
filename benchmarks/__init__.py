"""Benchmarks of d2pruner_kernels against its peers and the hardware floor (docs/design.md §7).
Every timing goes through `d2pruner_kernels.timing`.

    pytest benchmarks/ --benchmark-only      per-stage and end-to-end timings
    python -m benchmarks.report [--quick]    one markdown table with the floor
    python -m benchmarks.stage_times         per-stage GPU timings and A/B rows
    python -m benchmarks.tables              results/*.md from results/history.jsonl, where
                                             report / stage_times --record append
"""
