"""apply(), the Pruner it returns, and calibrate_prior()."""
from __future__ import annotations

import numbers
import weakref
from collections.abc import Mapping

import torch

from ..options import PruneOptions
from ..prior import PositionalPrior
from ._common import Adapter, Stop
from ._llm import InLLM
from ._select import Selector
from ._vision import OnVision
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_video import QwenVideoAdapter
from .gemma3 import Gemma3Adapter
from .qwen3_5 import Qwen3_5Adapter

# The built-in adapters, each naming its transformers classes (Adapter.model_classes; no class
# named twice). A model gets the adapter of the nearest named class in its MRO (_adapter), so
# this order only orders the names in the error message of an unsupported model.
ADAPTERS = (LlavaAdapter, Qwen2VLAdapter, QwenVideoAdapter, LlavaNextAdapter,
            LlavaOnevisionAdapter, InternVLAdapter, Qwen3VLAdapter, Qwen3_5Adapter, Gemma3Adapter)
WHERE = ("llm", "vision")
# model -> weakref to its Pruner. Nothing here keeps a model alive: the key is weak, and the
# value must not hold the model (a Pruner does, so it is held weakly). The model's own hooks
# keep an installed Pruner alive (hook -> mode -> Pruner._on_kept), so the entry lives exactly
# as long as the pruner is installed, and a model dropped without remove() is freed by gc.
_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _active(model):
    """The Pruner installed on `model`, or None."""
    ref = _ACTIVE.get(model)
    pruner = ref() if ref is not None else None
    return pruner if pruner is not None and pruner.active else None


_REGISTERED: dict = {}  # model class -> Adapter subclass (register_adapter); classes only


def register_adapter(model_class, adapter):
    """Teaches `apply()` and `calibrate_prior()` a model family: models of `model_class`
    (or a subclass) get `adapter(model)`. Returns the adapter registered before for that
    class (None if none); `adapter=None` removes the registration. A registered class wins
    over the built-in ones (README's table; a registration for a built-in class, as the
    example below is for InternVL, replaces its adapter) and a subclass's over its base's.
    (Built-in adapters name their classes in `model_classes`, each class in one adapter;
    the nearest named class in the model's MRO picks. A registered adapter needs none.)

    adapter: a subclass of `hf.Adapter` (or of `hf.LlavaAdapter` / `hf.Qwen2VLAdapter` to
    reuse theirs), constructed with the model; it tells the machinery where things are:

      family           a short name (repr, messages)
      outer            the module whose forward takes input_ids / inputs_embeds (the
                       image placeholders are visible there), e.g. model.model
      language_model   the decoder: .layers (each with .self_attn, dispatching through
                       transformers' AttentionInterface) and .config
      image_token_id   the placeholder token of an image in input_ids
      tokens_per_image the LLM tokens of one image where the model fixes it (LLaVA: 576),
                       with `grid` its (H, W); None where it depends on the input (Qwen)
      check(where)     raise ValueError if the model's configuration cannot be pruned
                       `where` ("llm" or "vision"); called by apply() before anything is
                       installed
      images(sample, runs, lm_kwargs, outer) -> [(start, end, grid)]
                       the images of one sample in token order, from the runs of
                       placeholders [(start, end)] of that sample; LlavaAdapter cuts each
                       run into blocks of tokens_per_image on `grid`, Qwen2VLAdapter reads
                       each run's (t, h, w) from the M-RoPE positions in lm_kwargs
      check_images(spans, outer)   optional cross-check of the whole batch
      image_mask(input_ids, inputs_embeds)   optional: bool [B, L] of placeholders
                       (default: token_mask(image_token_id, input_ids, inputs_embeds))
      default_layer() / check_layer(layer)   optional: the family's default `layer` (else
                       2) and a ValueError for a layer it cannot read (Qwen3.5: layer - 1
                       must be a full-attention layer)
      layer_kind(index) / layer_mask(kind, index, seq)   optional, for decoders whose
                       layers take different masks (Gemma 3's sliding / full, Qwen3.5's
                       linear / full): the mask of each kind from layer K on, built from a
                       _llm.PrunedSeq (see hf/gemma3.py, hf/qwen3_5.py)
    where="vision" also needs `projector` (the module whose output is the image features,
    [n_images, tokens_per_image, D]) and `vision_attention()` -> (the attention module whose
    CLS row is the importance, its layer index): see LlavaAdapter.

    Example, InternVL (one 16 x 16 grid of tokens per 448-px tile after pixel shuffle;
    LLaVA's way of cutting runs into images, so its adapter is reused):

        from transformers import InternVLForConditionalGeneration
        from d2pruner_kernels import hf

        class InternVLAdapter(hf.LlavaAdapter):
            family = "internvl"

            def __init__(self, model):
                hf.Adapter.__init__(self, model)
                cfg = model.config
                side = int(cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]
                           * cfg.downsample_ratio)
                self.outer, self.language_model = model.model, model.model.language_model
                self.image_token_id = cfg.image_token_id
                self.grid, self.tokens_per_image = (side, side), side * side

            def check(self, where):
                if where != "llm":
                    raise ValueError("InternVL: where='llm' only")

        hf.register_adapter(InternVLForConditionalGeneration, InternVLAdapter)
        pruner = hf.apply(model, 64)     # each tile (thumbnail included) keeps 64 of 256

    More in docs/integration.md.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, torch.nn.Module)):
        raise TypeError(f"model_class must be a torch.nn.Module subclass (the model's class), "
                        f"got {model_class!r}")
    if adapter is not None and not (isinstance(adapter, type) and issubclass(adapter, Adapter)):
        raise TypeError(f"adapter must be a subclass of d2pruner_kernels.hf.Adapter (or None "
                        f"to remove the registration), got {adapter!r}")
    before = _REGISTERED.pop(model_class, None)
    if adapter is not None:
        _REGISTERED[model_class] = adapter
    return before


def _built_in() -> dict:
    """transformers class -> built-in adapter, from ADAPTERS' model_classes."""
    table = {}
    for adapter in ADAPTERS:
        for cls in adapter.classes():
            if table.setdefault(cls, adapter) is not adapter:
                raise AssertionError(f"{cls.__name__} is named by {table[cls].__name__} and "
                                     f"{adapter.__name__}")
    return table


def _adapter(model):
    """The adapter of the nearest class in the model's MRO that is registered
    (register_adapter), else of the nearest one a built-in adapter names."""
    for cls in type(model).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls](model)
    built_in = _built_in()
    for cls in type(model).__mro__:
        if cls in built_in:
            return built_in[cls](model)
    names = ", ".join(name for adapter in ADAPTERS for name in adapter.model_classes)
    extra = f", and what is registered ({', '.join(c.__name__ for c in _REGISTERED)})" \
        if _REGISTERED else ""
    raise TypeError(f"d2pruner_kernels.hf supports {names}{extra}; got "
                    f"{type(model).__name__}. To add a family, write an adapter and call "
                    f"hf.register_adapter({type(model).__name__}, adapter): see "
                    f"help(hf.register_adapter) and docs/integration.md")


def _check_layer(layer, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    if not 1 <= layer <= n_layers - 1:
        raise ValueError(f"layer must be in [1, {n_layers - 1}] (the model has {n_layers} "
                         f"decoder layers; importance comes from layer - 1), got {layer}")
    return int(layer)


def _setup(model, where, layer):
    adapter = _adapter(model)
    if where not in WHERE:
        raise ValueError(f"where must be 'llm' or 'vision', got {where!r}")
    adapter.check(where)
    if where == "llm":
        if layer is None:  # the family's default: 2 (Qwen3.5: its first full-attention layer + 1)
            layer = getattr(adapter, "default_layer", lambda: 2)()
        layer = _check_layer(layer, len(adapter.language_model.layers))
        if hasattr(adapter, "check_layer"):  # e.g. Qwen3.5: layer - 1 must be full attention
            adapter.check_layer(layer)
    elif layer is not None:
        raise ValueError(f"where='vision' reads the vision tower (LLaVA: the CLIP layer of "
                         f"config.vision_feature_layer; Qwen: the tower's last full-attention "
                         f"block); layer={layer!r} applies to where='llm' only (leave it None)")
    return adapter, layer


def _mode(adapter, where, layer, selector, on_kept, collect=None):
    """What prunes: inside the language model at `layer`; or on the vision side, before the
    first decoder layer with the tower's own importance (Qwen2.5-VL, Qwen3-VL: the
    adapter's vision_source), or on the projected features with the CLS row (LLaVA)."""
    if where == "llm":
        return InLLM(adapter, layer, selector, on_kept, collect=collect)
    source = adapter.vision_source()
    if source is not None:
        return InLLM(adapter, 0, selector, on_kept, collect=collect, source=source)
    return OnVision(adapter, selector, on_kept, collect=collect)


class Pruner:
    """D2Pruner installed on a model by `apply()`; `remove()` (or leaving the `with` block)
    restores the model exactly.

    kept:  after each prefill with images, a list over samples of lists over that sample's
           images of int64 CPU tensors, the kept indices within the image's visual tokens,
           ascending (a sample without images: []); None before the first prefill.
    grids: the same nesting, each image's grid in LLM tokens ((H, W), or (t, h, w) for Qwen).
    importance: the same nesting, each image's raw importance row (float32 CPU [N]: the
           attention the pruner read, before the prior), what `calibrate_prior` averages.
    kinds: the same nesting, "image" or "video" for each item: where="llm" prunes the
           videos of Qwen2.5-VL and Qwen3-VL too (each video one item, grid (t, h, w),
           k per video), and each sample's list holds its images and videos in sequence
           order (kept[b][i] is a video where kinds[b][i] == "video").

    The outer list is over the rows of the batch the prefill saw: after generate() with
    num_beams=n (or num_return_sequences=n when sampling), n rows per sample, rows
    b*n ... b*n + n - 1 for sample b, with identical selections. generate(use_cache=False)
    makes every step a prefill of the whole sequence, pruned again (where="llm": from the
    attention of the newest token, so the selection and the tokens can differ from the
    cached run); these then hold the last step's. To draw a selection over a picture that
    the processor cropped (LLaVA-1.5: the central square), use draw_kept(..., crop="center").
    The pruner references its model (keeping the pruner keeps the model); nothing else the
    package holds does. More in docs/integration.md.
    """

    def __init__(self, model, adapter, k, where, layer, selector):
        self.model, self.k, self.where, self.layer = model, k, where, layer
        self.family = adapter.family
        self.kept = None
        self.grids = None
        self.importance = None
        self.kinds = None
        self._selector = selector
        self._impl = _mode(adapter, where, layer, selector, self._on_kept)

    @property
    def prior(self):
        return self._selector.prior

    @property
    def options(self) -> PruneOptions:
        """The PruneOptions every prune() call of this pruner gets (prior included)."""
        return self._selector.options

    @property
    def active(self) -> bool:
        return self._impl is not None

    def _on_kept(self, kept, grids, importance, kinds=None):
        self.kept, self.grids, self.importance = kept, grids, importance
        self.kinds = kinds if kinds is not None else [["image"] * len(s) for s in kept]

    def _install(self):
        if _active(self.model) is not None:
            raise RuntimeError(f"a Pruner is already applied to this "
                               f"{type(self.model).__name__}: call its remove() first")
        self._impl.install()
        _ACTIVE[self.model] = weakref.ref(self)

    def remove(self) -> None:
        """Removes every hook and restores the attention configs; a second call does nothing."""
        if self._impl is None:
            return
        self._impl.remove()
        self._impl = None
        ref = _ACTIVE.get(self.model)
        if ref is not None and ref() is self:
            del _ACTIVE[self.model]

    def __enter__(self) -> "Pruner":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        where = f"where='llm', layer={self.layer}" if self.where == "llm" else "where='vision'"
        return (f"Pruner({type(self.model).__name__}, k={self.k!r}, {where}, "
                f"prior={'yes' if self.prior is not None else None}, {state})")


def apply(model, k, *, where: str = "llm", layer: int | None = None, prior=None,
          **prune_options) -> Pruner:
    """Prunes the visual tokens of every image in every prefill of `model` with D2Pruner.

    model: a transformers 5.x model of a supported family (README's table: LLaVA-1.5,
           LLaVA-NeXT, LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
           Gemma 3; others through register_adapter) with attn_implementation sdpa, eager
           or flash_attention_*.
    k:     visual tokens kept per image (int), or a ratio in (0, 1] resolved per image by
           prune()'s rule.
    where: "llm" (the paper's setting): importance = the attention of each sample's last
           prompt token at decoder layer `layer - 1` over the image's tokens (softmax over
           every key it sees, mean over heads), features = the hidden states entering
           `layer`; from `layer` on the pruned tokens are gone from the sequence, the mask
           and the KV cache, and kept tokens keep their positions.
           "vision" (LLaVA): importance = the CLS row of the CLIP layer that produces the
           selected features, features = the projected image features; the LLM receives k
           tokens per image in a shorter prompt with contiguous positions.
           "vision" (Qwen2.5-VL, Qwen3-VL; docs/spec.md §15.5, the vLLM plugin's rule):
           importance = the attention each merged token receives in the tower's last
           full-attention block (mean over its query tokens and heads), features = the
           tower's merged features; pruned before the first decoder layer, so every layer
           and the cache hold the shorter sequence, kept tokens at their M-RoPE positions.
    layer: the decoder layer K that sees the pruned sequence, in [1, num_layers - 1];
           None: 2, or for Qwen3.5 its first full-attention layer + 1 (layer - 1 must be a
           full-attention layer there: a linear one has no attention row).
    prior: a PositionalPrior (resized bilinearly to each image's grid where it was
           calibrated on another one: our extension) or a positive tensor [N] for the grid.
    prune_options: a PruneOptions as `options=`, and/or its fields as keywords
           (pivot_ratio, sim_threshold, spatial_weight, radius, temporal_radius, eps,
           check_finite, backend, fusion), checked here; `prior` wins over options.prior.

    Returns a Pruner: `pruner.kept` after each prefill, `pruner.remove()` (or `with`).
    Misuse raises here, before the model is touched.
    """
    adapter, layer = _setup(model, where, layer)
    static_grid = adapter.grid if adapter.tokens_per_image is not None else None
    selector = Selector(k, prior, prune_options, grid=static_grid)
    pruner = Pruner(model, adapter, k, where, layer, selector)
    pruner._install()
    return pruner


def calibrate_prior(model, batches, *, where: str = "llm", layer: int | None = None,
                    grid=None, progress: bool = True) -> PositionalPrior:
    """The positional prior of `model`: the mean of exactly the importance rows `apply`
    would use (same `where` and `layer`), over the images of `batches`.

    batches: an iterable of processed inputs (dicts of tensors, as the processor returns
             them); each runs as one prefill, stopped as soon as its rows are known.
    grid:    None: every image must have the first image's grid (else ValueError); a grid:
             every image's row is resampled bilinearly to it first (align_corners=False,
             like PositionalPrior.resized; our extension, for Qwen's images of many sizes).
             An image that is a TokenLayout (InternVL, LLaVA-NeXT / OneVision) counts as its
             pieces, a tiled piece as its tiles, each a map of its own (ours): InternVL's
             tiles and thumbnail give a per-tile prior, which apply() repeats over the
             tiles; an anyres image's base and high-resolution map (newline column
             included) need grid=..., e.g. the base image's. A video (Qwen2.5-VL,
             Qwen3-VL; grid (t, h, w)) counts as its t frames, each a map on (1, h, w)
             like an image (ours): the prior is per frame, and apply() repeats it over
             a video's frames (PositionalPrior.for_grid).
    progress: a tqdm progress bar over the batches.
    """
    adapter, layer = _setup(model, where, layer)
    from ..checks import grid_dims
    target = None if grid is None else grid_dims("grid", grid)
    maps: list = []
    state = {"grid": target, "prior": None, "images": 0}

    def collect(rows, grids):
        for image_row, image_grid in zip(rows, grids):
            if not _is_layout(image_grid) and len(image_grid) == 3 and image_grid[0] > 1:
                # a video (t, h, w): one map per frame, each on (1, h, w) like an image
                t, n = image_grid[0], image_row.numel() // image_grid[0]
                image_row = image_row.reshape(t, n)
                image_grid = [(1,) + tuple(image_grid[1:])] * t
                for frame_row, frame_grid in zip(image_row, image_grid):
                    collect([frame_row], [frame_grid])
                continue
            for row, g in _maps(image_row, image_grid):
                state["images"] += 1
                row = row.detach().to(torch.float64).cpu()
                if state["grid"] is None:
                    state["grid"] = tuple(g)
                want = state["grid"]
                if target is None and tuple(g) != want:
                    raise ValueError(f"image {state['images'] - 1} has grid {tuple(g)} but the "
                                     f"first image has {want}: pass grid=... to resample every "
                                     f"image's row to one grid")
                maps.append(_resample(row, tuple(g), want))

    impl = _mode(adapter, where, layer, Selector(1, None, {}), lambda *a: None, collect)
    if where == "llm":
        src_layer, query = layer - 1, "last"
    elif getattr(impl, "source", None) is not None:  # a Qwen tower's block, every query
        src_layer, query = impl.source.layer, "mean"
    else:
        src_layer, query = impl.vision_layer, "cls"
    if _active(model) is not None:
        raise RuntimeError(f"a Pruner is applied to this {type(model).__name__}: call its "
                           f"remove() before calibrating")
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    impl.install()
    try:
        from tqdm.auto import tqdm
        device = next(model.parameters()).device
        for batch in tqdm(batches, desc="calibrating prior", disable=not progress):
            if not isinstance(batch, Mapping):
                raise TypeError(f"each batch must be a mapping of model inputs (as a processor "
                                f"returns), got {type(batch).__name__}")
            inputs = {key: v.to(device) if isinstance(v, torch.Tensor) else v
                      for key, v in batch.items()}
            with torch.no_grad():
                try:
                    model(**inputs, use_cache=False)
                except Stop:
                    pass
            if maps:
                if state["prior"] is None:
                    state["prior"] = PositionalPrior(state["grid"], model=name,
                                                     layer=src_layer, query=query)
                state["prior"].update(torch.stack(maps))
                maps.clear()
    finally:
        impl.remove()
    if state["prior"] is None:
        raise ValueError("the batches held no image: nothing to calibrate")
    return state["prior"]


def _is_layout(grid) -> bool:
    from ..token_layout import TokenLayout
    return isinstance(grid, TokenLayout)


def _maps(row: torch.Tensor, grid):
    """(row, grid) pairs of one image: itself, or a TokenLayout's pieces, tiles one by one."""
    from ..token_layout import TokenLayout
    if not isinstance(grid, TokenLayout):
        yield row, tuple(grid)
        return
    start = 0
    for piece in grid.pieces:
        if piece.tile is None:
            yield row[start:start + piece.cells], (piece.grid if piece.grid[0] > 1
                                                   else piece.grid[1:])
        else:
            per = piece.tile[0] * piece.tile[1]
            for s in range(start, start + piece.cells, per):
                yield row[s:s + per], tuple(piece.tile)
        start += piece.cells


def _resample(row: torch.Tensor, grid: tuple, want: tuple) -> torch.Tensor:
    """A score row on `grid`, as a map on `want` (bilinear per frame, align_corners=False)."""
    from ..checks import as_3d
    g3, w3 = as_3d(grid), as_3d(want)
    if g3 == w3:
        return row
    if g3[0] != w3[0]:
        raise ValueError(f"an image on grid {grid} cannot be resampled to {want}: the number "
                         f"of frames differs")
    frames = row.reshape(g3[0], 1, g3[1], g3[2])
    out = torch.nn.functional.interpolate(frames, size=w3[1:], mode="bilinear",
                                          align_corners=False)
    return out.reshape(-1)
