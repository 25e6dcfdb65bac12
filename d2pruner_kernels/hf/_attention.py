"""Reading one attention module's queries and keys through transformers' AttentionInterface.

A `Tap` gives one attention module (the LLM's layer K - 1, or the CLIP layer of LLaVA's
vision features) a private copy of its config whose `_attn_implementation` is
"d2pruner_<base>" (e.g. "d2pruner_sdpa"). That name is registered in `AttentionInterface`
as `_tapped_attention`, which hands the queries and keys (RoPE applied, keys after the
cache update) to the tap and then runs the base implementation unchanged, with the
module's own config restored for the call (flash-attention reads the implementation's name
from it). Every other module keeps the shared config, so the model's masks are still built
for the base implementation.

The base implementation is read from the shared config at every call, not fixed at
install: `model.set_attn_implementation(...)` after apply() changes the shared configs
(never our copy), and the tapped module follows it like every other module; an
implementation outside SUPPORTED raises at the call.

The trap this avoids: an attention function registered under a new name receives
`mask=None` (left padding silently ignored) unless a mask function is registered under the
same name in `AttentionMaskInterface`. Masks are built from the language model's config,
which keeps the base name; the base's mask function is registered under our name as well,
so a mask built from a tapped module's config would still be right.
"""
from __future__ import annotations

import copy
import sys

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# The implementations a pruned model may use. flex_attention (block masks) and the paged
# implementations (continuous batching) are refused: their masks and caches are not ours to
# rebuild. flash-attention needs the flash-attn package (and a GPU): not run by the tests.
SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
PREFIX = "d2pruner_"
ATTR = "_d2pruner_tap"


def base_implementation(config, what: str) -> str:
    """The attention implementation `config` runs, checked against SUPPORTED."""
    impl = config._attn_implementation
    if isinstance(impl, str) and impl.startswith(PREFIX):  # a tapped module's own copy
        impl = impl[len(PREFIX):]
    if impl not in SUPPORTED:
        raise ValueError(f"{what} uses attn_implementation={impl!r}; d2pruner_kernels.hf "
                         f"supports {', '.join(SUPPORTED)} (load the model with one of them, "
                         f"e.g. attn_implementation='sdpa')")
    return impl


def mask_function(impl: str):
    """transformers' mask builder for `impl` (AttentionMaskInterface): sdpa_mask,
    eager_mask or flash_attention_mask; all take (batch_size, q_length, kv_length,
    q_offset, kv_offset, attention_mask=2-D bool or None, dtype, device)."""
    return ALL_MASK_ATTENTION_FUNCTIONS[impl]


def _base_function(module, impl: str):
    if impl == "eager":  # not in the interface: each model file defines its own
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no module-level "
                             f"eager_attention_forward to run under attn_implementation='eager'")
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def _tapped_attention(module, query, key, value, attention_mask, **kwargs):
    tap = module.__dict__.get(ATTR)
    if tap is None:  # a config copied from a tapped module, on a module we never tapped
        raise RuntimeError(f"{type(module).__name__} runs the d2pruner attention wrapper but "
                           f"is not tapped (was its config copied from a pruned model?)")
    function = tap.sync()  # the implementation the model uses now
    if tap.callback is not None:
        tap.callback(query, key, kwargs)
    own = module.config
    module.config = tap.config  # the base implementation sees the model's own config
    try:
        return function(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = own


def _register(impl: str) -> str:
    name = PREFIX + impl
    AttentionInterface.register(name, _tapped_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


class Tap:
    """Calls `callback(query, key, kwargs)` whenever `module` (an attention module that
    dispatches through AttentionInterface) runs; `callback = None` passes through."""

    def __init__(self, module, what: str):
        if ATTR in module.__dict__:
            raise RuntimeError(f"{what} is already tapped by another pruner")
        self.module, self.what = module, what
        self.config = module.config  # the shared config: set_attn_implementation changes it
        self.impl = base_implementation(self.config, what)
        self.function = _base_function(module, self.impl)
        self.callback = None
        self._own = None
        self._installed = False

    def sync(self):
        """The base function of the implementation the shared config names now (raises
        ValueError for one outside SUPPORTED); our copy of the config is renamed to match."""
        impl = base_implementation(self.config, self.what)
        if impl != self.impl:
            function = _base_function(self.module, impl)
            if self._own is not None:
                self._own._attn_implementation = _register(impl)
            self.impl, self.function = impl, function
        return self.function

    def install(self) -> "Tap":
        own = copy.copy(self.config)  # shallow: every setting shared, only the name differs
        own._attn_implementation = _register(self.impl)
        self.module.__dict__[ATTR] = self
        self.module.config = own
        self._own = own
        self._installed = True
        return self

    def remove(self) -> None:
        if self._installed:
            self.module.config = self.config
            self.module.__dict__.pop(ATTR, None)
            self._own = None
            self._installed = False
