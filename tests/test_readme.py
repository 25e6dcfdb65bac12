"""The README's Python examples run as written (docs that match the code)."""
import re
from pathlib import Path

from d2pruner_kernels import PositionalPrior

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write their files here
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    # usage, ragged batches, attention rows from Q and K (one span, a padded batch), the prior
    assert len(blocks) == 5
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    assert PositionalPrior.load(tmp_path / "toy_prior.safetensors").count == 40
