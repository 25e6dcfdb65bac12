"""Steps 1-7 of a ragged batch (prune_varlen, docs/spec.md §11.4) on the kernels backend:
one launch per stage for the whole batch, whatever the images' sizes, grids and budgets
(docs/design.md, "Ragged batches").

    scores        the packed attention [1, H, total] through the scores kernel (per token)
    rank + norms  one launch: each image ranked among its own tokens (rank.py, RAGGED)
    graph         one launch per row range (1, or 2 with the lazy prefix): every image's
                  tiles in one flat grid, each image in its own layout (graph.py, RAGGED)
    MIS           one launch per row range: a block per image, kept ids written straight
                  into the packed output with the token offsets added (csrc/, ragged table)

Every size the launches need comes from the ragged table (kernels/ragged.py), built on the
host from the validated lists and copied to the device once; it is cached per layout, so
a repeated layout (a serving bucket) copies nothing. Nothing reads a device value on the
host: no sync. Streams and CUDA graphs: see `plan` and `device_table`. The result equals the per-image prune() exactly: each
image's rank order, norms and K slices are computed as they are for it alone, and the MIS
is exact whatever rows it is given (lazy_graph.py).
"""
from __future__ import annotations

import collections
import math

import torch

from ..layout import num_words
from ..options import PruneOptions
from ..token_layout import TokenLayout, coords_table
from . import cdiv, graph, lazy_graph, mis, ragged, rank, scores, sm_count

CACHE_SIZE = 64  # layouts whose tables stay on the device (LRU)
_cache: collections.OrderedDict = collections.OrderedDict()
_captured: dict = {}  # plans read during CUDA-graph capture: never dropped (device_table)


def _tri(r: int) -> int:
    return r * (r + 1) // 2


class Plan:
    """The launches of one ragged layout, decided on the host from the sizes alone."""

    def __init__(self, images, grids, ks, n_pivots, d: int, dtype: torch.dtype,
                 device: torch.device, key=None, temporal_radius: int | None = None):
        self.key = key  # its cache key (plan())
        self.batch = len(images)
        self.config = graph.default_config(dtype, d)
        block, block_k = self.config["BLOCK"], self.config["BLOCK_K"]
        k_steps = cdiv(d, block_k)
        lengths = [e - s for s, e in images]
        self.max_tokens = max(lengths)
        self.total = images[-1][1]
        self.sort_rank = self.max_tokens > rank.MAX_N  # above it, torch.sort (padded rows)
        cands = [n - n_p for n, n_p in zip(lengths, n_pivots)]
        members = [k - n_p for k, n_p in zip(ks, n_pivots)]
        # each image's K slices as it gets them alone (graph.split_count of its own tiles)
        slice_steps = [cdiv(k_steps, graph.split_count(_tri(cdiv(c, block)), k_steps, device))
                       for c in cands]
        tiles_all = sum(_tri(cdiv(c, block)) for c, m in zip(cands, members) if m > 0)
        self.needs_graph = any(m > 0 for m in members)
        # Row ranges (lazy_graph.py): the whole batch's tiles decide whether a prefix of
        # each graph comes first; an image without supplements (m = 0) needs no row.
        waves = tiles_all / sm_count(device) if device.type == "cuda" else math.inf
        ends = [lazy_graph.row_ranges(c, m, block, waves) if m > 0 else [0]
                for c, m in zip(cands, members)]
        self.ranges = max(len(e) for e in ends)
        spans = []  # per range, per image: its rows (begin, end); past its last range empty
        for q in range(self.ranges):
            spans.append([])
            for e in ends:
                end = e[min(q, len(e) - 1)]
                begin = 0 if q == 0 else e[min(q, len(e)) - 1]
                spans[-1].append((min(begin, end), end))
        # TokenLayouts (docs/spec.md §13): every image's (t', y, x) table packed like the
        # tokens (a raster grid's as TokenLayout.grid's), each image's temporal radius' in
        # the table; temporal_radius is then the options' (it shapes the tables)
        coords = radii = None
        if any(isinstance(g, TokenLayout) for g in grids):
            parts = [coords_table(g if isinstance(g, TokenLayout) else TokenLayout.grid(*g),
                                  temporal_radius) for g in grids]
            coords, radii = torch.cat([t for t, _ in parts]), [r for _, r in parts]
        built = ragged.build_table(lengths, n_pivots, ks, ranges=spans, block=block,
                                   grids=[(1, 1, 1) if isinstance(g, TokenLayout) else g
                                          for g in grids],
                                   slice_steps=slice_steps, rank_block=rank.rank_block(),
                                   temporal_radii=radii)
        self.kept_len, self.adj_words = built.kept_len, built.adj_words
        self.rank_programs, self.range_tiles = built.rank_programs, built.range_tiles
        table = built.rows
        host = torch.tensor(table, dtype=torch.int64)  # [R, B, FIELDS]
        self.stream = self.copied = None
        if device.type == "cuda":  # pinned: the copy is asynchronous (and capturable)
            host = host.pin_memory()
        self.host = host  # kept alive with the plan: a captured copy reads it at each replay
        self.table = host.to(device, non_blocking=True)
        self.coords_host = self.coords = None  # int32 [total, 3] with TokenLayouts
        if coords is not None:
            self.coords_host = coords.pin_memory() if device.type == "cuda" else coords
            self.coords = self.coords_host.to(device, non_blocking=True)
        if device.type == "cuda":  # the copy is queued on this stream; others wait for it
            self.stream = torch.cuda.current_stream(device)
            self.copied = torch.cuda.Event()
            self.copied.record(self.stream)


def plan(images, grids, ks, n_pivots, d: int, dtype: torch.dtype, device: torch.device,
         temporal_radius: int | None = None) -> Plan:
    """The Plan of this layout, cached (LRU): a layout seen before builds and copies nothing.

    A plan is built outside CUDA-graph capture only: building one pins host memory (the
    pinned allocator may query events, which a capture forbids) and copies it. A layout
    first met inside a capture raises before any work; run it once before capturing (the
    warm-up torch.cuda.graph asks for anyway). temporal_radius: the options', read (and
    keyed) only when a grid is a TokenLayout."""
    key = (tuple(images), tuple(grids), tuple(ks), tuple(n_pivots), d, dtype, device)
    if any(isinstance(g, TokenLayout) for g in grids):
        key += (temporal_radius,)
    else:
        temporal_radius = None
    p = _captured.get(key)
    if p is not None:
        return p
    p = _cache.get(key)
    if p is not None:
        _cache.move_to_end(key)
        return p
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "prune_varlen(backend='kernels') met this batch layout (image sizes, grids and "
            "budgets) for the first time inside a CUDA graph capture: its ragged table "
            "cannot be built and copied during a capture. Run the same layout once before "
            "capturing (a warm-up call), then capture")
    p = _cache[key] = Plan(images, grids, ks, n_pivots, d, dtype, device, key, temporal_radius)
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return p


def device_table(p: Plan) -> torch.Tensor:
    """The plan's table [R, B, FIELDS] as the current stream may read it, without a host
    sync (and capturable):

    * on the stream that copied it: the table itself;
    * on another stream: that stream first waits for the copy (an event recorded after
      it), and the table is recorded on it (Tensor.record_stream), so dropping the plan from
      the cache never frees memory a queued kernel still reads;
    * inside a CUDA graph capture: a copy of the plan's pinned host rows made inside the
      graph, so each replay orders its own copy before its kernels, whatever stream built
      the plan (a capture may not wait on work recorded outside it); the plan, whose
      pinned rows that copy reads, is kept for good (`_captured`), outliving every graph."""
    return _served(p, p.table, p.host)


def device_coords(p: Plan) -> torch.Tensor | None:
    """The plan's coordinate table (None without TokenLayouts), as `device_table` serves
    the table: waited for and recorded on another stream, copied inside a capture."""
    return _served(p, p.coords, p.coords_host)


def _served(p: Plan, table: torch.Tensor | None, host: torch.Tensor | None):
    """One of the plan's device tables (copied from its pinned `host` rows on p.stream) as
    the current stream may read it: see device_table."""
    if table is None or p.stream is None:  # none, or CPU (the interpreter)
        return table
    if torch.cuda.is_current_stream_capturing():
        _captured[p.key] = p
        return host.to(table.device, non_blocking=True)
    stream = torch.cuda.current_stream(table.device)
    if stream != p.stream:
        stream.wait_event(p.copied)
        table.record_stream(stream)
    return table


def _sorted_order(s: torch.Tensor, p: Plan, table: torch.Tensor) -> torch.Tensor:
    """Rank orders of images above rank.MAX_N tokens: one stable descending torch.sort of
    the scores padded to [B, max N] with -inf. Pads come after every token of their row,
    -inf scores included (their index is larger), so row b starts with image b's order."""
    t = table[0]
    dev = s.device
    img = torch.repeat_interleave(torch.arange(p.batch, device=dev), t[:, ragged.TOKENS],
                                  output_size=p.total)  # output_size: no sync
    local = torch.arange(p.total, device=dev) - t[img, ragged.TOKEN_OFFSET]
    padded = s.new_full((p.batch, p.max_tokens), float("-inf"))
    padded[img, local] = s
    idx = torch.sort(padded, dim=1, descending=True, stable=True).indices
    return idx[img, local]  # image b's rank r at its token offset + r


def prune_ragged(tokens: torch.Tensor, attn: torch.Tensor, prior: torch.Tensor | None, images,
                 grids, ks, n_pivots, params: PruneOptions) -> torch.Tensor:
    """Steps 1-7 of a ragged batch: kept positions int64 [sum k_b] into the packed tokens,
    each image's ascending, images in order. tokens [total, D], attn [total] / [H, total], prior packed [total] or None;
    images (start, end), grids (T, H, W) or TokenLayout, ks, n_pivots: host lists, validated."""
    x = tokens if tokens.stride(-1) == 1 else tokens.contiguous()  # one copy at most
    total, d = x.shape
    p = plan(images, grids, ks, n_pivots, d, x.dtype, x.device, params.temporal_radius)
    table, coords = device_table(p), device_coords(p)
    # 1: per-token math; the packed batch is one image of `total` tokens to the kernel
    s = scores.debiased_scores(attn.unsqueeze(0), prior, params.eps)[0]
    # 2: rank order (+ the norms the graph needs), each image among its own tokens
    feats = x if p.needs_graph else None
    if p.sort_rank:
        order = _sorted_order(s, p, table)
        norms = rank.rank_and_norms(None, x.unsqueeze(0))[1][0] if feats is not None else None
    else:
        order, norms = rank.rank_and_norms_ragged(s, feats, table[0], p.rank_programs)
    # 4-7: the graph in row ranges and the MIS after each (lazy_graph.py's protocol)
    adj = torch.empty(max(1, p.adj_words), dtype=torch.int32, device=x.device)
    kept = torch.empty(p.kept_len, dtype=torch.int64, device=x.device)
    done = None if p.ranges == 1 else torch.empty(p.batch, dtype=torch.int32, device=x.device)
    for q in range(p.ranges):
        skip = None if q == 0 else done
        if p.needs_graph:
            graph.ragged_rows(x, norms, order, adj, table[q], p.range_tiles[q], params,
                              p.config, skip=skip, coords=coords)
        mis.greedy_mis_ragged(adj, order, table[q], kept, p.max_tokens, skip=skip, done=done)
    return kept
