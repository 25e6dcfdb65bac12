"""The python blocks of the README and of docs/guide.md run as written (docs that match the
code)."""
import re
from pathlib import Path

import pytest

from d2pruner_kernels import PositionalPrior

ROOT = Path(__file__).resolve().parents[1]
# page -> its python blocks, by what they show
PAGES = {
    "README.md": ["prune() and PruneOptions"],
    "docs/guide.md": ["ragged batches", "attention rows from Q and K: one span",
                      "attention rows: a padded batch", "the positional prior"],
}


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def test_every_python_block_is_counted():
    """A block added to or dropped from a page fails here first (so none goes untested)."""
    for page, names in PAGES.items():
        assert len(_blocks(page)) == len(names), page


@pytest.mark.parametrize("page", sorted(PAGES))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their files here
    for block in _blocks(page):
        exec(compile(block, str(ROOT / page), "exec"), {})
    if page == "docs/guide.md":
        assert PositionalPrior.load(tmp_path / "toy_prior.safetensors").count == 40
