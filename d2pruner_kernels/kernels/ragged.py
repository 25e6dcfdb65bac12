"""The ragged table (prune_varlen's fused GPU path, docs/design.md "Ragged batches"): one row
of FIELDS int64 per image, built on the host from the validated sizes, copied to the device
once per call (or cached), read by the rank, graph and MIS launches. Plain ints, no Triton:
the MIS side (mis.py, csrc/mis.h's RaggedField, the same numbers) imports it too.

A table is [R, B, FIELDS]: one [B, FIELDS] slice per range of graph rows (the lazy graph:
R = 1 or 2); only ROW_BEGIN, ROW_END and TILE_START differ between the slices.
"""
TOKEN_OFFSET = 0  # its first token in the packed tokens / norms / scores / order
TOKENS = 1        # N_b
PIVOTS = 2        # n_pivots_b
KEEP = 3          # k_b
KEEP_OFFSET = 4   # its first entry in the packed kept
ADJ_OFFSET = 5    # first int32 word of its [C_b, words(C_b)] graph in the packed adjacency
ROW_BEGIN = 6     # graph rows [ROW_BEGIN, ROW_END) built by this range's launch (multiples of
ROW_END = 7       #   the tile, but ROW_END <= C_b); the MIS reads rows [0, min(ROW_END, C_b))
TILE_START = 8    # its first program in this range's graph launch (tiles of earlier images)
RANK_START = 9    # its first program in the rank launch
GRID_H = 10       # its grid (T, H, W): H and W (the spatial term)
GRID_W = 11
K_CHUNK = 12      # the width of its K slices (graph.split_count of the image alone: the
#                   slices it gets in its own prune()), in K steps of the graph's BLOCK_K
FIELDS = 16       # row stride (13-15 unused)
