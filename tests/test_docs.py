"""The docs against the code, where they drift: links, the file listing of docs/design.md §8,
the numbers the pages quote from code constants, and the lists of modules and commands.
(tests/test_readme.py runs the pages' python blocks.)"""
from __future__ import annotations

import ast
import dataclasses
import fnmatch
import math
import re
import subprocess
from pathlib import Path

import pytest

from d2pruner_kernels import PruneOptions

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "NOTES.md"]
DESIGN = ROOT / "docs" / "design.md"
# where every file must be named in design.md §8 (and the top-level files it lists)
LISTED_TREES = ("d2pruner_kernels", "csrc", "docs", "examples", "benchmarks", "tests", ".ci",
                "tools")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _one_line(text: str) -> str:
    """Prose with its line breaks as spaces (numbers are quoted across wrapped lines)."""
    return " ".join(text.split())


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _links(path: Path):
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            yield target


def test_every_relative_link_resolves():
    checked = 0
    for page in PAGES:
        for target in _links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.relative_to(ROOT)}: link to missing {target}"
            if anchor:
                assert anchor in _anchors(dest), \
                    f"{page.relative_to(ROOT)}: no heading #{anchor} in {dest.relative_to(ROOT)}"
            checked += 1
    assert checked >= 10  # the pages do link to each other


def _listing() -> list[str]:
    """The paths of design.md §8's listing: one per line, nesting by two-space indent."""
    section = _text(DESIGN).split("## 8. Where things are", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    paths, stack = [], []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        stack[depth:] = [name]
        paths.append("".join(stack[:depth]) + name)
    return paths


def _files(tree: str) -> list[str]:
    """The repository's files under `tree`: git's list where this is a checkout (files being
    written in the tree are not the repository's yet), else the folder's."""
    try:
        out = subprocess.run(["git", "ls-files", "--", tree], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [p.relative_to(ROOT).as_posix() for p in (ROOT / tree).rglob("*") if p.is_file()]
    return sorted(f for f in out if (ROOT / f).is_file() and "__pycache__" not in f
                  and not f.endswith((".pyc", ".so")) and "/results/" not in f)


def _covers(entry: str, file: str) -> bool:
    """A listed entry names a file, a folder (ends with /) or a family (a * pattern)."""
    return file.startswith(entry) if entry.endswith("/") else fnmatch.fnmatchcase(file, entry)


def test_design_listing_names_every_file_and_only_files_there_are():
    entries = _listing()
    files = [f for tree in LISTED_TREES for f in _files(tree)]
    # folders with lines of their own inside are opened: their files need lines too
    opened = {e for e in entries if e.endswith("/") and any(
        x != e and x.startswith(e) for x in entries)}
    leaves = [e for e in entries if e not in opened]
    for entry in entries:
        exists = ((ROOT / entry).is_dir() if entry.endswith("/") else
                  any(_covers(entry, f) for f in files) if "*" in entry else
                  (ROOT / entry).is_file())
        assert exists, f"docs/design.md §8 lists {entry}, which does not exist"
    missing = [f for f in files if not any(_covers(e, f) for e in leaves)]
    assert not missing, f"files not in docs/design.md §8: {missing}"


def test_kernels_docstring_names_every_kernel_module():
    import d2pruner_kernels.kernels as kernels

    modules = sorted(p.name for p in (ROOT / "d2pruner_kernels" / "kernels").glob("*.py")
                     if p.name != "__init__.py")
    assert len(modules) >= 10
    missing = [m for m in modules if m not in kernels.__doc__]
    assert not missing, f"kernels/__init__.py's docstring does not name {missing}"


def test_design_names_what_ci_runs_and_every_benchmark_command():
    design = _text(DESIGN)
    ci = _text(ROOT / ".ci" / "run")
    section6 = design.split("## 6.", 1)[1].split("## 7.", 1)[0]
    scripts = re.findall(r"^(\.ci/\S+)", ci, re.M)
    modules = re.findall(r"-m (benchmarks\.\w+)", ci)
    assert scripts and modules
    for name in scripts + modules:
        assert f"`{name}`" in section6, f"docs/design.md §6 does not say .ci/run runs {name}"
    section7 = design.split("## 7.", 1)[1].split("## 8.", 1)[0]
    runnable = sorted(Path(f).stem for f in _files("benchmarks")
                      if f.endswith(".py") and '__name__ == "__main__"' in _text(ROOT / f))
    assert len(runnable) >= 8
    missing = [m for m in runnable if f"python -m benchmarks.{m}" not in section7]
    assert not missing, f"benchmarks runnable but not in docs/design.md §7: {missing}"


def test_numbers_quoted_from_code_constants():
    pytest.importorskip("triton")  # the kernel modules define their constants beside the kernels
    from d2pruner_kernels import _C
    from d2pruner_kernels.kernels import cpu_walk, lazy_graph, rank, ragged, scores, varlen

    design = _one_line(_text(DESIGN))
    # §4: the CPU walk's window sizes, and the first window at LLaVA-1.5 k = 64 (m = 20)
    slack, pad = cpu_walk._SLACK, cpu_walk._PAD
    assert f"ceil({slack:g} m) + {pad}" in design
    assert f"{slack:g} · (members still needed) · (visited / members) + {pad}" in design
    first = math.ceil(slack * 20) + pad
    assert f"first window ({first} candidates" in design and f"{first}² · 4096" in design
    # §2: the CUDA MIS limit, the rank kernel's limit, the lazy prefix, the ragged table
    limit = f"{_C.max_cuda_tokens:,}"
    assert limit in design
    assert f"`MAX_N = {rank.MAX_N}`" in design
    assert f"One program per {scores.BLOCK_N} tokens" in design
    assert f"{scores.HEADS_UNROLLED} loads in flight" in design
    assert (f"max({lazy_graph.PREFIX_MIN}, {lazy_graph.PREFIX_PER_MEMBER}m)" in design
            and f"max({lazy_graph.PREFIX_MIN}, {lazy_graph.PREFIX_PER_MEMBER} m_b)" in design)
    assert f"one row of {ragged.FIELDS} int64 per image" in design
    assert f"LRU, {varlen.CACHE_SIZE} layouts" in design
    for page in (ROOT / "README.md", ROOT / "docs" / "guide.md"):
        if page.exists() and "tokens" in _text(page) and "130," in _text(page):
            assert limit in _text(page), page


def _option_rows(text: str) -> dict[str, object]:
    """`name=value` in the first cell of the rows of a markdown table."""
    rows = re.findall(r"^\| `(\w+)=([^`]+)` \|", text, re.M)
    return {name: ast.literal_eval(value) for name, value in rows}


def test_option_tables_show_prune_options_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(PruneOptions)}
    pages = [p for p in (ROOT / "README.md", ROOT / "docs" / "guide.md")
             if p.exists() and _option_rows(_text(p))]
    assert pages
    for page in pages:
        rows = _option_rows(_text(page))
        assert set(rows) == set(fields), (page.name, set(rows) ^ set(fields))
        for name, default in fields.items():
            assert rows[name] == default, (page.name, name, rows[name], default)


def _table(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table whose first column is `first_header`."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.split("|")[1].strip() == first_header)
    cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]  # noqa: E731
    rows = []
    for ln in lines[start + 2:]:
        if set(ln) <= set("|-: "):
            break
        rows.append(cells(ln))
    return cells(lines[start]), rows


def test_readme_speed_table_is_the_recorded_report():
    """The README's GPU table is a selection of cells of the generated report, unchanged."""
    readme = _text(ROOT / "README.md")
    report = _text(ROOT / "benchmarks" / "results" / "h200_report.md")
    head, rows = _table(readme.split("## Speed", 1)[1], "shape")
    rhead, rrows = _table(report, "shape")
    by_shape = {r[0]: r for r in rrows}
    assert len(rows) >= 5
    commit = re.search(r"commit (\w+)", report).group(1)
    date = re.search(r"date: (\d{4}-\d\d-\d\d)", report).group(1)
    speed = _one_line(readme.split("## Speed", 1)[1])
    assert f"commit {commit}" in speed and date in speed and "H200" in speed
    for row in rows:
        want = by_shape[row[0]]
        for name, cell in zip(head, row):
            assert name in rhead, name
            assert cell == want[rhead.index(name)], (row[0], name, cell)


def test_code_names_the_docs_quote_exist():
    """Every `snake_case`, `CamelCase` or `UPPER_CASE` name the user and design pages quote
    is still in the code (a rename leaves no stale name behind in the docs)."""
    sources = [p for tree in LISTED_TREES for p in map(ROOT.joinpath, _files(tree))
               if p.suffix in (".py", ".h", ".cpp", ".cu", ".sh", "")]
    code = "\n".join(_text(p) for p in sources + [ROOT / "Makefile", ROOT / "pyproject.toml"])
    words = set(re.findall(r"\w+", code))
    checked = 0
    for page in ("README.md", "docs/guide.md", "docs/design.md", "docs/speed.md"):
        for name in set(re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", _text(ROOT / page))):
            last = name.split(".")[-1]
            if "_" in last or re.search(r"[a-z][A-Z]", last) or last.isupper():
                assert last in words, f"{page} quotes `{name}`, which the code no longer has"
                checked += 1
    assert checked >= 50
