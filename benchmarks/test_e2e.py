"""benchmarks.e2e on the tiny models (its --quick run, seconds): the rows are there, the
pruned runs keep k tokens per image, their KV cache is smaller by exactly the dropped tokens'
slots in the layers from K on, the table comes back from the history, and the README's
end-to-end table is the generated one."""
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks import e2e, history, tables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _cells(records):
    out = {}
    for r in records:
        if r["row"] != "run":
            out.setdefault((r["row"], r["shape"], r["note"]), {})[r["column"]] = r["value"]
    return out


def test_quick_run_records_what_pruning_removes(tmp_path):
    hist, md = tmp_path / "history.jsonl", tmp_path / "e2e.md"
    assert e2e.main(["--quick", "--out", str(md), "--record", str(hist)]) == 0
    records = history.load(hist)
    assert {r["table"] for r in records} == {"e2e"}
    assert {r["command"] for r in records} == {
        f"python -m benchmarks.e2e --quick --out {md} --record {hist}"}
    facts = {r["column"]: r["value"] for r in records if r["row"] == "run"}
    assert facts["dtype"] == "float32" and facts["pruning layer K"] == 2
    cells = _cells(records)

    from d2pruner_kernels.hf import tiny
    for name, model, n_image, prompt in (
            ("tiny-llava", tiny.tiny_llava(), 576, 1 + 576 + 1 + len(e2e.TEXT)),
            ("tiny-qwen25vl", tiny.tiny_qwen2_vl(v2_5=True), 64, 2 + 66 + len(e2e.TEXT))):
        cfg = model.config.get_text_config()
        layers = cfg.num_hidden_layers
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        slot = 2 * cfg.num_key_value_heads * head_dim * 4        # K and V, float32, one layer
        assert cells[name, "", "model"]["parameters"] == sum(p.numel()
                                                             for p in model.parameters())
        for batch in (1, 2):
            base = cells[name, f"B={batch}", "unpruned"]
            assert base["TTFT"] > 0 and base["decode / token"] > 0
            assert base["prompt tokens at layer K"] == prompt
            assert base["KV / request"] == layers * prompt * slot
            for label in ("D2Pruner k=16", "top-k attn k=16", "D2Pruner k=0.25",
                          "top-k attn k=0.25"):
                if name == "tiny-llava" and "0.25" in label:
                    assert (name, f"B={batch}", label) not in cells   # ratios: Qwen only
                    continue
                k = 16  # 0.25 of Qwen's 64 tokens is 16 too
                row = cells[name, f"B={batch}", label]
                assert row["kept per image"] == k
                assert row["prompt tokens at layer K"] == prompt - n_image + k
                dropped = (layers - 2) * (n_image - k) * slot
                assert row["KV / request"] == base["KV / request"] - dropped
                assert 0 < row["pruner share"] < 1 and row["TTFT"] > 0

    text = md.read_text(encoding="utf-8")
    assert "| tiny-llava | 2 | 16 |" in text and "| tiny-qwen25vl | 1 | 0.25 |" in text
    # the history gives the same table back
    assert tables.main(["--history", str(hist), "--out", str(tmp_path)]) == 0
    again = (tmp_path / f"{tables.slug(records[0]['device'])}_e2e.md").read_text("utf-8")
    assert text.split("\n| model", 1)[1] == again.split("\n| model", 1)[1]


def test_top_k_attention_variant_is_the_raw_top_k():
    """The FastV-style row: no prior and pivot_ratio=1, which docs/spec.md §5 defines as
    the top-k of the raw attention row: the kept tokens are the k largest of the row the
    pruner read."""
    import torch
    from d2pruner_kernels import hf
    from d2pruner_kernels.hf import tiny
    (label, kw), = [v for v in e2e.variants([24]) if v[0].startswith("top-k")]
    model = tiny.tiny_llava()
    inputs = tiny.llava_inputs(model, [[5, 6, 7], [8, 9]])
    with hf.apply(model, kw.pop("k"), layer=2, **kw) as pruner:
        model(**inputs)
    assert pruner.prior is None and pruner.options.pivot_ratio == 1.0
    for b in range(2):
        row = pruner.importance[b][0]
        want = torch.sort(torch.topk(row, 24).indices).values
        assert torch.equal(pruner.kept[b][0], want)


def test_readme_e2e_table_is_the_recorded_run():
    """The README's end-to-end rows are cells of the generated table, unchanged, and the
    section names its device, date and command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    speed = readme.split("## Speed", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in speed.splitlines() if ln.startswith("| ") and ln.count("|") > 10
            and not ln.startswith(("| model", "| shape"))]
    sources = sorted((ROOT / "benchmarks" / "results").glob("*_e2e.md"))
    if "benchmarks.e2e" not in speed:
        pytest.fail("README's Speed section does not show the end-to-end table")
    assert sources, "no benchmarks/results/*_e2e.md"
    generated = {ln for s in sources for ln in s.read_text("utf-8").splitlines()}
    assert rows and all(r in generated for r in rows), [r for r in rows if r not in generated]
    for src in sources:
        text = src.read_text("utf-8")
        date = re.search(r"date: (\d{4}-\d\d-\d\d)", text).group(1)
        command = re.search(r"command: `([^`]+)`", text).group(1)
        one_line = " ".join(speed.split())
        assert date in one_line and command in one_line
