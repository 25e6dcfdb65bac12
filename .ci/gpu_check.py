"""The GPU check: what runs on a lent H100 / H200 (issue 22), as steps with time budgets.

    python3 .ci/gpu_check.py [--plan call1|call2|all] [--steps "a b ..."] [--budget S]
                             [--out DIR] [--commit HASH] [--dry]

(.ci/gpu_check.sh is the entry point: it runs this and prints the summary whatever
happened.) The steps run in order while the budget (seconds from the start) lasts. Each
step has a minimum and a maximum: one that would start with less than its minimum left is
SKIPPED and says so; one that runs is given min(maximum, what is left), then SIGINT (pytest
writes its summary and junit file), then SIGKILL of its process group. After every step
DIR/summary.md and DIR/summary.json are rewritten and DIR/logs.tgz repacked, so a call cut
off mid-step still returns what ran. What comes back in DIR (8 files at most):

    summary.md       one page: device, versions, each step's status and time, the failing
                     and skipped tests, the slowest tests, every timing with its device
    summary.json     the same as data
    history.jsonl    the benchmark rows (benchmarks/results/history.jsonl's format, the
                     device named in each; --commit fills the commit a copied tree lacks)
    junit_<step>.xml pytest's junit file of each test step (per-test times)
    logs.tgz         every step's full log (pytest --durations, ptxas registers, sanitizers)

Steps (GPU; budgets in seconds, min/max):
    env        5/30   nvidia-smi, python / torch / triton / CUDA / setuptools / pybind11 /
                      cmake / nvcc / compute-sanitizer / pytest plugins
    build     20/150  _C with CMake + ninja straight into d2pruner_kernels/ (no pip, so the
                      machine's setuptools does not matter; pyproject's SPDX licence needs
                      >= 77), for this device's arch, ptxas -v; the repo goes on PYTHONPATH.
                      Not rebuilt when a _C with CUDA newer than csrc/ is there (warm machine)
    gpu_tests 60/200  tests/test_gpu.py (the GPU-only tests), xdist, per-test timeout
    bench     40/120  benchmarks.varlen_ab: prune_varlen vs dense prune() on equal images,
                      vs a loop of prune() on a mixed batch, D 1176 vs padded vs 1152
    racecheck 20/60   compute-sanitizer racecheck on .ci/sanitize.py mis (the MIS kernel:
                      dense, lazy, ragged 2 ranges)
    memcheck  40/110  memcheck on .ci/sanitize.py full, PYTORCH_NO_CUDA_MEMORY_CACHING=1
    suite     60/300  the other GPU-relevant test files (not CPU-only ones), xdist; last in
                      call 1: whatever the budget has left
    synccheck 15/45   synccheck on sanitize.py mis
    initcheck 30/80   initcheck on sanitize.py full (no caching allocator)
    stages    60/150  benchmarks.stage_times --record (per-stage timings)
    report    60/240  benchmarks.report --record (the README's table; in no plan: name it)

Plans: call1 = env build gpu_tests bench racecheck memcheck suite (BUDGET 540: run with
timeout_s 560; the suite gets what is left, at least 60 s, and a suite cut short still
reports what ran); call2 = env build synccheck initcheck stages (on the same warm machine
right after; its budget is what device time is left); rest = env build suite. --dry: the whole plan on a
CPU (TRITON_INTERPRET=1, tiny shapes, sanitizer bodies without compute-sanitizer, the build
into a scratch folder, the suite collected only; plan "dry": synccheck and initcheck left
out, their bodies run as racecheck and memcheck): CI runs it so the check cannot rot; any
failed or skipped step fails it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/test_gpu.py"]
# every test file with a kernel path a GPU changes (CPU-only files are left out: test_cpu_walk,
# test_reference, test_prior, test_demo, test_readme, the hf / vLLM / options files)
SUITE = ["tests/test_varlen.py", "tests/test_attention_kernel.py", "tests/test_mis_kernel.py",
         "tests/test_stages.py", "tests/test_graph_kernel.py", "tests/test_rank_kernel.py",
         "tests/test_scores_kernel.py", "tests/test_prune.py", "tests/test_lazy_graph.py",
         "tests/test_token_layout.py",
         "tests/test_compile.py"]
PLANS = {"call1": "env build gpu_tests bench racecheck memcheck suite",
         "call2": "env build synccheck initcheck stages"}
PLANS["all"] = PLANS["call1"] + " " + " ".join(PLANS["call2"].split()[2:]) + " report"
PLANS["rest"] = "env build suite"  # when call 1's suite ran out of time
# the dry run: every step but synccheck / initcheck, whose bodies racecheck / memcheck run
# (all steps are still built, so a broken one fails the dry run too)
PLANS["dry"] = "env build gpu_tests bench racecheck memcheck suite stages"
BUDGETS = {"env": (5, 30), "build": (20, 150), "gpu_tests": (60, 200), "bench": (40, 120),
           "racecheck": (20, 60), "memcheck": (40, 110), "suite": (60, 300),
           "synccheck": (15, 45), "initcheck": (30, 80), "stages": (60, 150), "report": (60, 240)}
TEST_TIMEOUT = 150  # seconds per test (pytest-timeout, else the fallback plugin below)


@dataclasses.dataclass
class Step:
    name: str
    min_s: float
    max_s: float
    cmd: list | None = None             # a command, run in its own process group
    fn: object = None                   # or a Python function(log) -> (ok, [detail lines])
    env: dict = dataclasses.field(default_factory=dict)
    junit: str | None = None            # pytest's junit file, parsed after the run
    what: str = ""
    grace: float | None = None          # SIGINT this long before the limit (default 10 s)


@dataclasses.dataclass
class Result:
    name: str
    status: str                         # PASS, FAIL, TIMEOUT, SKIPPED
    seconds: float = 0.0
    rc: int | None = None
    detail: list = dataclasses.field(default_factory=list)
    what: str = ""


class Check:
    def __init__(self, out: Path, budget: float, dry: bool, commit: str | None):
        self.t0 = time.time()
        self.out, self.budget, self.dry, self.commit = out, budget, dry, commit
        self.logs = Path(tempfile.mkdtemp(prefix="d2p_gpu_check_"))
        self.scratch = Path(tempfile.mkdtemp(prefix="d2p_gpu_check_scratch_"))
        for old in ("summary.md", "summary.json", "history.jsonl", "logs.tgz",
                    "junit_gpu_tests.xml", "junit_suite.xml"):  # a reused --out: this run only
            (out / old).unlink(missing_ok=True)
        self.results: list[Result] = []
        self.facts: dict = {"mode": "dry run on a CPU (TRITON_INTERPRET=1)" if dry else "GPU"}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), str(REPO / ".ci"),
                                                                 os.environ.get("PYTHONPATH")])))
        self.env.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "d2p_triton_cache"))
        if dry:
            self.env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")

    def close(self) -> None:
        """Removes the scratch folders (the logs live on in logs.tgz)."""
        shutil.rmtree(self.logs, ignore_errors=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def left(self) -> float:
        return self.t0 + self.budget - time.time()

    # -- running ------------------------------------------------------------------------------

    def run(self, step: Step) -> Result:
        left = self.left()
        if left < step.min_s:
            r = Result(step.name, "SKIPPED", detail=[f"{left:.0f} s left, needs {step.min_s:.0f}"],
                       what=step.what)
            self.finish(r)
            return r
        limit = min(step.max_s, left)
        log = self.logs / f"{step.name}.log"
        t = time.time()
        print(f"\n== {step.name} (t+{t - self.t0:.0f} s, {left:.0f} s left, limit {limit:.0f} s)"
              f"{': ' + step.what if step.what else ''}", flush=True)
        if step.fn is not None:
            try:
                with open(log, "a") as f:
                    ok, detail = step.fn(f)
                status, rc = ("PASS" if ok else "FAIL"), None
            except Exception as e:  # noqa: BLE001  (reported, the next step runs)
                status, rc, detail = "FAIL", None, [f"{type(e).__name__}: {e}"]
        else:
            rc, timed_out = self.command(step, log, limit)
            status = "TIMEOUT" if timed_out else "PASS" if rc == 0 else "FAIL"
            detail = [f"rc={rc}"] if rc else []
            if step.junit:
                detail += junit_detail(self.out / step.junit, self.dry)
            detail += log_detail(log)
        r = Result(step.name, status, round(time.time() - t, 1), rc, detail, step.what)
        self.finish(r)
        return r

    def command(self, step: Step, log: Path, limit: float) -> tuple[int, bool]:
        env = dict(self.env, **step.env)
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, step.cmd))}\n")
            f.flush()
            try:
                p = subprocess.Popen([str(c) for c in step.cmd], cwd=REPO, env=env, stdout=f,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:  # e.g. no compute-sanitizer on this machine
                f.write(f"[gpu_check] cannot start: {e}\n")
                return 127, False
            # SIGINT first: pytest stops, prints its summary and writes its junit file
            grace = step.grace if step.grace is not None else 10 if limit > 30 else 0
            try:
                return p.wait(timeout=limit - grace), False
            except subprocess.TimeoutExpired:
                pass
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
                if p.poll() is not None or (sig == signal.SIGINT and not grace):
                    continue
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=wait)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            f.write(f"\n[gpu_check] TIMED OUT after {limit:.0f} s\n")
            return p.returncode, True

    def finish(self, r: Result) -> None:
        self.results.append(r)
        line = f"{r.name}: {r.status} ({r.seconds:.0f} s)" + (f" {r.detail[0]}" if r.detail else "")
        print(line, flush=True)
        for d in r.detail[1:12]:
            print(f"    {d}", flush=True)
        self.write()

    # -- reporting ----------------------------------------------------------------------------

    def write(self) -> None:
        """summary.md / summary.json / logs.tgz, rewritten after each step."""
        hist = self.out / "history.jsonl"
        rows = []
        if hist.exists():
            rows = [json.loads(x) for x in hist.read_text().splitlines() if x.strip()]
            if self.commit and any(r.get("commit") in ("unknown", None) for r in rows):
                for r in rows:
                    if r.get("commit") in ("unknown", None):
                        r["commit"] = self.commit
                hist.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        (self.out / "summary.md").write_text(self.markdown(rows))
        (self.out / "summary.json").write_text(json.dumps(
            dict(facts=self.facts, budget=self.budget, elapsed=round(time.time() - self.t0, 1),
                 steps=[dataclasses.asdict(r) for r in self.results]), indent=1, default=str))
        with tarfile.open(self.out / "logs.tgz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")

    def markdown(self, rows: list[dict]) -> str:
        f = self.facts
        lines = [f"# GPU check ({f.get('mode')}): {f.get('device', '?')}", "",
                 f"- versions: {f.get('versions', '?')}",
                 f"- tools: {f.get('tools', '?')}",
                 f"- commit: {self.commit or f.get('commit', '?')}; budget {self.budget:.0f} s, "
                 f"elapsed {time.time() - self.t0:.0f} s", "",
                 "| step | status | s | what | first line of its result |", "|---|---|---|---|---|"]
        for r in self.results:
            first = (r.detail[0] if r.detail else "").replace("|", "/")[:100]
            lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.what} | {first} |")
        for r in self.results:
            if r.detail:
                lines += ["", f"**{r.name}** ({r.status})", ""] + [f"    {d}" for d in r.detail[:40]]
        if rows:
            lines += ["", f"## Timings (every row on its device; {len(rows)} records)", "",
                      "| device | table | row | shape | column | value |", "|---|---|---|---|---|---|"]
            for r in rows:
                v = r["value"]
                val = (f"{v * 1e6:.1f} µs" if r["unit"] == "s" else f"{v} {r['unit']}".strip()) \
                    if isinstance(v, (int, float)) else str(v)[:80]
                lines.append(f"| {r['device']} | {r['table']} | {r['row']} | {r['shape']} | "
                             f"{r['column']} | {val} |")
        return "\n".join(lines) + "\n"


# --- parsing what a step left ----------------------------------------------------------------

def junit_detail(path: Path, dry: bool) -> list[str]:
    """Counts, failing tests with their message, skip reasons, the slowest tests."""
    if not path.exists():
        return [f"no junit file ({path.name}): pytest died before writing it"]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return [f"junit unreadable: {e}"]
    cases = list(root.iter("testcase"))
    cut = [c for c in cases if c.get("name") is None]  # the test a SIGINT stopped: no name
    cases = [c for c in cases if c.get("name") is not None]
    failed, skipped = [], {}
    for c in cases:
        name = f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}"
        for tag in ("failure", "error"):
            for e in c.findall(tag):
                failed.append(f"{tag.upper()} {name}: {(e.get('message') or '').splitlines()[0][:200] if e.get('message') else ''}")
        for e in c.findall("skipped"):
            reason = (e.get("message") or "").strip()[:120]
            skipped[reason] = skipped.get(reason, 0) + 1
    n_skip = sum(skipped.values())
    out = [f"{len(cases) + len(cut)} tests: {len(cases) - len(failed) - n_skip} passed, "
           f"{len(failed)} failed, {n_skip} skipped"
           + (f", {len(cut)} interrupted (the tests after it did not run)" if cut else "")]
    out += failed[:30]
    out += [f"skipped x{n}: {why}" for why, n in sorted(skipped.items(), key=lambda x: -x[1])[:8]]
    slow = sorted(cases, key=lambda c: -float(c.get("time", 0)))[:8]
    out += [f"slowest: {float(c.get('time', 0)):.1f} s {c.get('name')}" for c in slow
            if float(c.get("time", 0)) > (0 if dry else 1)][:8]
    return out


def log_detail(path: Path) -> list[str]:
    """The lines of a log worth a glance: sanitizer summaries, answers, errors, timings."""
    keys = ("ERROR SUMMARY", "RACECHECK SUMMARY", "Hazard", "all answers right", "Traceback",
            "Error:", "error:", "TIMED OUT", "registers", "spill", " | ours ", "-> ", "with_cuda",
            "collected", "tests collected", "Invalid", "Uninitialized", "Race reported",
            "cannot start")
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    hits = [ln.strip()[:240] for ln in text if any(k in ln for k in keys)]
    if not hits and text:
        hits = [ln.strip()[:240] for ln in text[-3:]]
    return hits[:25]


# --- the steps -------------------------------------------------------------------------------

def sh(cmd: str) -> str:
    try:
        r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except subprocess.TimeoutExpired:
        return "(timed out)"


def env_step(check: Check):
    def fn(log):
        from importlib import metadata
        versions = {}
        for pkg in ("torch", "triton", "setuptools", "pybind11", "numpy", "pytest", "pytest-xdist",
                    "pytest-timeout", "hypothesis"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = "absent"
        probe = subprocess.run([sys.executable, "-c", "import torch, json; print(json.dumps(["
                                "torch.version.cuda, torch.cuda.is_available() and "
                                "torch.cuda.get_device_name(), torch.cuda.is_available() and "
                                "list(torch.cuda.get_device_capability())]))"],
                               capture_output=True, text=True, env=check.env, timeout=60)
        cuda, name, cc = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 \
            else (None, None, None)
        smi = sh("nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap "
                 "--format=csv,noheader") if shutil.which("nvidia-smi") else "no nvidia-smi"
        check.facts["device"] = (f"{name} ({smi})" if name else
                                 f"CPU ({os.cpu_count()} cores, no CUDA device)")
        check.facts["device_name"] = name or "CPU"
        check.facts["cc"] = cc
        check.facts["versions"] = (f"python {sys.version.split()[0]}, CUDA (torch) {cuda}, "
                                   + ", ".join(f"{k} {v}" for k, v in versions.items()))
        nvcc = sh("nvcc --version | tail -2 | head -1") if shutil.which("nvcc") else "absent"
        san = sh("compute-sanitizer --version | sed -n 2p") if shutil.which("compute-sanitizer") \
            else "absent"
        cmake = sh("cmake --version | head -1") if shutil.which("cmake") else "absent"
        check.facts["tools"] = (f"{cmake}; ninja {sh('ninja --version') if shutil.which('ninja') else 'absent'}; "
                                f"nvcc {nvcc}; compute-sanitizer {san}; load {os.getloadavg()[0]:.2f}, "
                                f"{os.cpu_count()} CPUs")
        check.facts["commit"] = sh(f"git -C {REPO} rev-parse --short HEAD 2>/dev/null") or "unknown (no .git)"
        check.facts["pytest_timeout"] = versions["pytest-timeout"] != "absent"
        check.facts["xdist"] = versions["pytest-xdist"] != "absent"
        log.write(json.dumps(check.facts, indent=1) + "\n")
        ok = bool(name) or check.dry
        return ok, [check.facts["device"], check.facts["versions"], check.facts["tools"]] + \
            ([] if ok else ["no CUDA device seen by torch: every later step would test nothing"])
    return Step("env", *BUDGETS["env"], fn=fn, what="device, versions, tools")


def build_step(check: Check):
    """_C with CMake + ninja, no pip: into the package folder (GPU) or a scratch one (dry)."""
    def fn(log):
        cc = check.facts.get("cc") or [9, 0]
        arch = f"{cc[0]}{cc[1]}"
        pkg = REPO / "d2pruner_kernels"
        digest = hashlib.sha256(arch.encode())
        for p in sorted((REPO / "csrc").iterdir()) + [REPO / "CMakeLists.txt"]:
            digest.update(p.name.encode() + p.read_bytes())
        stamp = REPO / "build" / "gpu_check.sources"
        if not check.dry:  # a warm machine: the same sources built already (mtimes of a copy lie)
            built = list(pkg.glob("_C*.so"))
            if built and stamp.exists() and stamp.read_text() == digest.hexdigest() \
                    and verify(check, None, log):
                return True, [f"{built[0].name} with CUDA already built from these sources: not rebuilt"]
            for p in built:
                p.unlink()
        dest = check.scratch if check.dry else pkg  # dry: a scratch folder, not the package
        # dry: a build folder of this checkout outside it (kept: a rerun is incremental)
        build = Path(tempfile.gettempdir()) / ("d2p_gpu_check_build_" + hashlib.sha256(
            str(REPO).encode()).hexdigest()[:10]) if check.dry else REPO / "build" / "gpu_check"
        pybind = pybind11_dir(check, log)
        if not pybind:
            return False, ["pybind11 not found (pip install pybind11, or on the GPU machine: it "
                           "should be there)"]
        configure = ["cmake", "-S", str(REPO), "-B", str(build), "-G", "Ninja",
                     "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
                     f"-Dpybind11_DIR={pybind}", f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={dest}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DCMAKE_CUDA_FLAGS=-Xptxas=-v"]
        detail = [f"cmake + ninja, sm_{arch}, into {'a scratch folder (dry)' if check.dry else 'd2pruner_kernels/'}"]
        nvcc = shutil.which("nvcc") or next((c for c in ("/usr/local/cuda/bin/nvcc",
                                                         "/usr/local/cuda-13.0/bin/nvcc")
                                             if os.path.exists(c)), None)
        cmake_env = dict(os.environ, **({"CUDACXX": nvcc} if nvcc else {}))
        if not nvcc:
            detail.append("no nvcc found: _C would be built without CUDA")
        for what, cmd in (("configure", configure),
                          ("build", ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2)])):
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               timeout=max(10.0, min(140.0, check.left() - 5)), env=cmake_env)
            if r.returncode:
                tail = [ln.strip()[:200] for ln in (check.logs / "build.log").read_text(
                    errors="replace").splitlines()[-12:]]
                return False, detail + [f"cmake {what} failed (rc {r.returncode})"] + tail
        log.flush()
        text = (check.logs / "build.log").read_text(errors="replace").splitlines()
        detail += [ln.strip()[:200] for ln in text if "registers" in ln or "spill" in ln.lower()][:8]
        so = sorted(dest.glob("_C*.so"))
        if not so:
            return False, detail + ["no _C*.so was written"]
        ok = verify(check, so[0] if check.dry else None, log)
        if ok and not check.dry:
            stamp.write_text(digest.hexdigest())
        return ok, detail + [f"built {so[0].name}; " + ("imports, with CUDA" if ok else
                                                        "does NOT import with a usable CUDA MIS")]
    return Step("build", *BUDGETS["build"], fn=fn, what="_C by CMake straight into the package (no pip)")


def pybind11_dir(check: Check, log) -> str | None:
    """pybind11's CMake folder: from this Python, else (dry run, a CI venv whose pybind11
    lived only in pip's build isolation) from a scratch install of it."""
    code = "import pybind11; print(pybind11.get_cmake_dir())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode == 0:
        return r.stdout.strip()
    if not check.dry:
        log.write(r.stderr)
        return None
    target = Path(tempfile.gettempdir()) / "d2p_pybind11"
    if not (target / "pybind11").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                        "pybind11>=2.12"], stdout=log, stderr=subprocess.STDOUT, timeout=120)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(target)))
    return r.stdout.strip() if r.returncode == 0 else None


def verify(check: Check, path: Path | None, log) -> bool:
    """The module imports (from the package, or from `path` in the dry run) with CUDA; on a
    GPU the CUDA MIS must be usable (mis.cuda_available())."""
    if path is not None:
        code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location("
                f"'d2pruner_kernels._C', {str(path)!r}); m = importlib.util.module_from_spec(s); "
                "s.loader.exec_module(m); print('with_cuda', m.with_cuda); assert m.with_cuda")
    else:
        code = ("from d2pruner_kernels import _C; from d2pruner_kernels.kernels import mis; "
                "print('with_cuda', _C.with_cuda, 'cuda MIS', mis.cuda_available(), _C.__file__); "
                "assert _C.with_cuda and mis.cuda_available()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=check.env,
                       cwd=tempfile.gettempdir(), timeout=120)
    log.write(r.stdout + r.stderr)
    return r.returncode == 0


def make_pytest_cmd(check: Check, files: list[str], junit: str, workers: int) -> list:
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "no:cacheprovider", "-rfEs",
           "--durations", "25", "--junitxml", str(check.out / junit), "-o", "junit_duration_report=call"]
    if check.facts.get("xdist") and workers > 1 and not check.dry:
        cmd += ["-n", str(workers)]
    if check.facts.get("pytest_timeout"):
        cmd += ["--timeout", str(TEST_TIMEOUT), "--timeout-method", "thread"]
    else:  # the fallback below (SIGALRM in the test's own process)
        cmd += ["-p", "gpu_check", "--d2p-timeout", str(TEST_TIMEOUT)]
    return cmd


def sanitizer(check: Check, name: str, tool: str, body: str, extra=()) -> Step:
    tiny = ["--tiny"] if check.dry else []
    script = [sys.executable, ".ci/sanitize.py", body, *tiny]
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"} if body == "full" else {}
    if check.dry:  # no compute-sanitizer on a CPU: the body alone, so it cannot rot
        cmd, what = script, f"{tool} body `{body}` (dry: without compute-sanitizer)"
    else:
        cmd = ["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", *extra, *script]
        what = f"compute-sanitizer {tool} on sanitize.py {body}" + \
            (" (no caching allocator)" if env else "")
    return Step(name, *BUDGETS[name], cmd=cmd, env=env, what=what)


def steps(check: Check, names: list[str]) -> list[Step]:
    dry = check.dry
    made = {
        "env": lambda: env_step(check),
        "build": lambda: build_step(check),
        "gpu_tests": lambda: Step("gpu_tests", *BUDGETS["gpu_tests"],
                                  cmd=make_pytest_cmd(check, GPU_TESTS, "junit_gpu_tests.xml", 4),
                                  junit="junit_gpu_tests.xml",
                                  what="tests/test_gpu.py" + (" (skipped without a GPU)" if dry else "")),
        "bench": lambda: Step("bench", *BUDGETS["bench"],
                              cmd=[sys.executable, "-m", "benchmarks.varlen_ab",
                                   "--record", str(check.out / "history.jsonl"),
                                   "--out", str(check.logs / "varlen.md"), *(["--quick"] if dry else [])],
                              what="prune_varlen vs dense prune() / a loop of prune(); D 1176; attention positions"),
        "racecheck": lambda: sanitizer(check, "racecheck", "racecheck", "mis"),
        "memcheck": lambda: sanitizer(check, "memcheck", "memcheck", "full", ["--leak-check", "no"]),
        "synccheck": lambda: sanitizer(check, "synccheck", "synccheck", "mis"),
        "initcheck": lambda: sanitizer(check, "initcheck", "initcheck", "full"),
        "suite": lambda: Step("suite", *BUDGETS["suite"],
                              cmd=make_pytest_cmd(check, SUITE, "junit_suite.xml", 8)
                              + (["--collect-only", "-q"] if dry else []),
                              junit=None if dry else "junit_suite.xml",
                              what=f"{len(SUITE)} GPU-relevant test files" + (" (dry: collected only)" if dry else "")),
        "stages": lambda: Step("stages", *BUDGETS["stages"],
                               cmd=[sys.executable, "-m", "benchmarks.stage_times",
                                    *(["--help"] if dry else ["--record", str(check.out / "history.jsonl"),
                                                              "--out", str(check.logs / "stages.md")])],
                               what="benchmarks.stage_times" + (" (dry: imports and --help; a GPU script)" if dry else "")),
        "report": lambda: Step("report", *BUDGETS["report"],
                               cmd=[sys.executable, "-m", "benchmarks.report",
                                    *(["--help"] if dry else ["--record", str(check.out / "history.jsonl"),
                                                              "--out", str(check.logs / "report.md")])],
                               what="benchmarks.report" + (" (dry: imports and --help)" if dry else "")),
    }
    unknown = [n for n in names if n not in made]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; known: {list(made)}")
    return [made[n]() for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", choices=list(PLANS), default=None)
    ap.add_argument("--steps", help="space-separated step names (overrides --plan)")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BUDGET", 540)))
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_out")
    ap.add_argument("--commit", help="the commit the copied tree is (the device has no .git)")
    ap.add_argument("--dry", action="store_true", help="the whole check on a CPU (CI)")
    args = ap.parse_args(argv)
    plan = args.plan or ("dry" if args.dry else "call1")
    names = (args.steps or os.environ.get("STEPS") or PLANS[plan]).split()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget, args.dry, args.commit)
    check.facts["plan"] = " ".join(names)
    # a SIGTERM (the caller's timeout) still leaves the summary of what ran
    signal.signal(signal.SIGTERM, lambda *_: (check.write(), sys.exit(143)))
    if args.dry:
        steps(check, PLANS["all"].split())  # each step can be made
    for step in steps(check, names):
        r = check.run(step)
        if step.name == "build" and r.status != "PASS":
            for later in names[names.index("build") + 1:]:
                check.finish(Result(later, "SKIPPED", detail=["the build failed"]))
            break
    check.write()
    bad = [r for r in check.results if r.status != "PASS" and (args.dry or r.status != "SKIPPED")]
    print("\n" + (out / "summary.md").read_text(), flush=True)
    # last, where a caller that keeps only the end of the output sees it: the steps again
    print(f"steps on {check.facts.get('device_name', '?')}:")
    for r in check.results:
        print(f"  {r.name:10} {r.status:8} {r.seconds:5.0f} s  {(r.detail[0] if r.detail else '')[:110]}")
    check.close()
    print(f"gpu_check: {len(check.results) - len(bad)}/{len(check.results)} steps passed"
          + (f"; not passed: {', '.join(f'{r.name} ({r.status})' for r in bad)}" if bad else "")
          + f"; {time.time() - check.t0:.0f} s", flush=True)
    return 1 if bad else 0


# --- fallback per-test timeout (a pytest plugin: `-p gpu_check`, when pytest-timeout is absent)

def pytest_addoption(parser):
    parser.addoption("--d2p-timeout", type=float, default=0.0,
                     help="fail a test that runs longer than this many seconds (SIGALRM)")


try:
    import pytest as _pytest

    @_pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(item):
        limit = item.config.getoption("--d2p-timeout", 0.0)
        if not limit or not hasattr(signal, "setitimer"):
            yield
            return

        def expired(signum, frame):
            raise TimeoutError(f"{item.nodeid} ran past {limit:.0f} s (gpu_check's per-test timeout)")
        old = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
except ImportError:  # pragma: no cover  (the driver itself needs no pytest)
    pass


if __name__ == "__main__":
    sys.exit(main())
