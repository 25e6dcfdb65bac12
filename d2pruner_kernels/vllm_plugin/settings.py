"""The plugin's settings: environment variables read in every vLLM process, parsed and
checked at engine start without a device (a setting valid on the serving machine never fails
here because this process has no GPU). Every bad value raises ValueError naming its variable.

    D2PRUNER_VLLM_K        an int >= 1 (image tokens kept per image) or a ratio in (0, 1]
    D2PRUNER_VLLM_OPTIONS  a JSON object of PruneOptions fields (prior apart), optional
    D2PRUNER_VLLM_PRIOR    a PositionalPrior file, optional
    D2PRUNER_VLLM_RECORD   debugging, tests: a JSON-lines file of the kept indices
"""
from __future__ import annotations

import json
import os
import warnings

from ..checks import check_k, resolve_k
from ..options import PruneOptions, of

ENV_K = "D2PRUNER_VLLM_K"
ENV_OPTIONS = "D2PRUNER_VLLM_OPTIONS"
ENV_PRIOR = "D2PRUNER_VLLM_PRIOR"
ENV_RECORD = "D2PRUNER_VLLM_RECORD"
OPTION_NAMES = tuple(n for n in PruneOptions.__dataclass_fields__ if n != "prior")
MAX_OPTIONS_CHARS = 4096  # a JSON object of 8 scalars is far shorter


class Settings:
    """k and the PruneOptions (prior included) of this process."""

    def __init__(self, k, options: PruneOptions, record: str | None):
        self.k, self.options, self.record = k, options, record

    @property
    def prior(self):
        return self.options.prior

    def budget(self, n: int) -> int:
        """Placeholders (= kept tokens) of an image of n tokens."""
        return resolve_k(self.k, n, name=ENV_K)


def parse_k(text: str):
    """D2PRUNER_VLLM_K's text as an int >= 1 or a ratio in (0, 1] (checks.check_k's rule)."""
    text = text.strip()
    shown = text if len(text) <= 40 else text[:40] + "..."
    for kind in (int, float):
        try:
            value = kind(text)
            break
        except ValueError:
            continue
    else:
        value = None
    try:
        return check_k(value, ENV_K)
    except ValueError:
        if isinstance(value, float):  # (NaN, inf, 1.5, -0.1)
            raise ValueError(f"{ENV_K} as a ratio must be in (0, 1], got {shown!r}") from None
        raise ValueError(f"{ENV_K} must be an int >= 1 (image tokens kept per image) or a "
                         f"ratio in (0, 1], got {shown!r}") from None
    except TypeError:
        raise ValueError(f"{ENV_K} must be an int >= 1 (image tokens kept per image) or a "
                         f"ratio in (0, 1], got {shown!r}") from None


def parse_options(text: str) -> dict:
    """The JSON object of D2PRUNER_VLLM_OPTIONS, refusing pathological input by its
    variable's name (deep nesting, huge numbers, other JSON values)."""
    if len(text) > MAX_OPTIONS_CHARS:
        raise ValueError(f"{ENV_OPTIONS} is {len(text)} characters long; expected a short JSON "
                         f"object of prune() options ({', '.join(OPTION_NAMES)})")
    try:
        options = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int digit limit, nesting
        raise ValueError(f"{ENV_OPTIONS} must be a JSON object of prune() options, got "
                         f"{text[:200]!r}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{ENV_OPTIONS} must be a JSON object, got {type(options).__name__}")
    return options


def read_settings(environ=None) -> Settings | None:
    """The settings from the environment, checked; None when D2PRUNER_VLLM_K is unset (with a
    warning when other D2PRUNER_VLLM_* settings are set: a typo must not go unnoticed)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_K, "").strip()
    if not raw:
        stray = sorted(name for name in env if name.startswith("D2PRUNER_VLLM_")
                       and name != ENV_K and env[name].strip())
        if stray:
            warnings.warn(f"{', '.join(stray)} set but {ENV_K} is not: D2Pruner pruning is off "
                          f"(set {ENV_K} to an int or a ratio to turn it on)", stacklevel=2)
        return None
    k = parse_k(raw)
    options = parse_options(env[ENV_OPTIONS]) if env.get(ENV_OPTIONS, "").strip() else {}
    prior = None
    if env.get(ENV_PRIOR, "").strip():
        from ..prior import PositionalPrior
        try:
            prior = PositionalPrior.load(env[ENV_PRIOR])  # load() checks it
        except (OSError, ValueError) as e:
            raise ValueError(f"{ENV_PRIOR}: {e}") from None
    try:
        opts = of(None, options, OPTION_NAMES, f"{ENV_OPTIONS} (prune())")
        opts = opts.replace(prior=prior)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{ENV_OPTIONS}: {e}") from None
    return Settings(k, opts, env.get(ENV_RECORD) or None)
