"""Kernel backends of the stages: Triton (scores, graph) and the compiled MIS (_C).

Each module imports lazily what it needs, so the package works without Triton or without
the compiled extension (the reference then runs instead, see `available()`)."""
