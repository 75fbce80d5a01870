#!/usr/bin/env python3
"""scillm gateway benchmark: scillm vs LiteLLM, Portkey and a bare Starlette pass-through.

    bench/run                      # all proxies, all scenarios, 2 runs each
    bench/run --transports         # bare pass-through with each HTTP client transport
    bench/run --help               # everything else

The first invocation (any python3 >= 3.10) installs what is missing, idempotently:
bench/.venv-bench (harness, mock, pass-through), bench/.venv-nosniffio,
bench/.venv-litellm, bench/node/node_modules (Portkey), and nodejs/npm via apt
if absent. See bench/README.md for what every number means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BENCH = os.path.join(HERE, ".venv-bench")
VENV_NOSNIFF = os.path.join(HERE, ".venv-nosniffio")
VENV_LITELLM = os.path.join(HERE, ".venv-litellm")
NODE_DIR = os.path.join(HERE, "node")
SCILLM_BIN = os.path.join(ROOT, ".venv", "bin", "scillm")
RESULTS_DIR = os.path.join(HERE, "results")

# BENCH_PORT_OFFSET moves every port (two benches on one shared box must not answer each other's requests)
PORT_OFFSET = int(os.environ.get("BENCH_PORT_OFFSET", "0"))
MOCK_PORT = 18080 + PORT_OFFSET
PORTS = {name: port + PORT_OFFSET for name, port in {
    "scillm": 14001, "litellm": 14002, "portkey": 14003, "bare": 14004, "scillm-nomw": 14005,
    "scillm-anthropic": 14006, "scillm-tracing": 14007, "scillm-before": 14008, "scillm-messages": 14009,
    "scillm-messages-translated": 14010, "scillm-noui": 14011, "scillm-keys": 14012, "scillm-nokeys": 14013,
    "scillm-key": 14014, "scillm-before-tracing": 14015, "scillm-before-keys": 14016}.items()}
PROXY_CORE, LOAD_CORE = 0, 1
CLIENT_KEY = "sk-dev-proxy-123"
MODEL = "openai/gpt-4o-mini"
ANCHORS = ["litellm", "portkey", "bare"]
ANCHOR_ABBR = {"litellm": "LiteLLM", "portkey": "Portkey", "bare": "bare"}
ANTHROPIC_MODEL = "claude-sonnet-4-5"
# middleware plugins switched off for the `scillm-nomw` row (entry-point names, see `scillm plugins`)
NOMW_PLUGINS = "resilience,cache,json,files,grounding,metrics,keys,budgets"
# the `scillm-keys` row calls with a virtual key that has every limit (so each request is admitted against a daily
# and a monthly budget, a team budget, rpm, tpm and a concurrency cap, and settled), set high enough never to refuse
KEY_LIMITS = {"daily_usd": 1e6, "monthly_usd": 1e7, "rpm": 10**9, "tpm": 10**12, "max_concurrency": 100_000}
# the `scillm-key` row: a typical key, a daily budget and a concurrency cap, no team
TYPICAL_KEY_LIMITS = {"daily_usd": 1e6, "max_concurrency": 100_000}
# scillm-vs-scillm comparisons reported as ratios when both rows were measured: (subject, base, title, meaning)
VARIANT_PAIRS = [
    ("scillm", "scillm-nomw", "middleware on / off",
     f"scillm with all middleware ÷ scillm with SCILLM_DISABLE_PLUGINS={NOMW_PLUGINS}"),
    ("scillm-keys", "scillm-nokeys", "keys and budgets on / off",
     "scillm called with a virtual key that has every budget and limit (daily, monthly and team dollars, rpm, tpm, "
     "concurrency) ÷ scillm with SCILLM_DISABLE_PLUGINS=keys,budgets called with the master key"),
    ("scillm-key", "scillm-nokeys", "typical key on / off",
     "scillm called with a virtual key that has a daily budget and a concurrency cap ÷ scillm with keys and "
     "budgets disabled"),
    ("scillm", "scillm-nokeys", "budgets plugin for the master key / off",
     "scillm as shipped, called with the master key (no limits to admit against: costs priced, ledger written) ÷ "
     "the same with keys and budgets disabled"),
    ("scillm-anthropic", "scillm", "Anthropic upstream / OpenAI upstream",
     f"model {ANTHROPIC_MODEL} through the anthropic provider (chat → Messages → chat translation) ÷ "
     f"{MODEL} through the OpenAI-compatible provider"),
    ("scillm-tracing", "scillm", "tracing on / off",
     "[tracing] on, sample_ratio 1.0, exporting OTLP/HTTP to the mock's /v1/traces ÷ the same tree as shipped "
     "(tracing off)"),
    ("scillm", "scillm-noui", "dashboard on / off",
     "this tree as shipped (tracing off, the dashboard's observer on) ÷ the same with SCILLM_DISABLE_PLUGINS=ui"),
    ("scillm-before-tracing", "scillm-before", "before: tracing on / off",
     "the --base-tree checkout with [tracing] on as in the scillm-tracing row ÷ the same checkout as shipped"),
    ("scillm-tracing", "scillm-before-tracing", "tracing on: this tree / before",
     "the scillm-tracing row ÷ the --base-tree checkout with the same [tracing] on"),
    ("scillm-keys", "scillm-before-keys", "every limit: this tree / before",
     "the scillm-keys row ÷ the --base-tree checkout called with the same virtual key and team budget"),
    ("scillm", "scillm-before", "this tree / before",
     "this tree as shipped (tracing off, dashboard on) ÷ the tree given with --base-tree (e.g. main before it)"),
    ("scillm-messages", "scillm-messages-translated", "Anthropic in → out: as sent / translated",
     f"POST /v1/messages for {ANTHROPIC_MODEL}, the body sent upstream as the client sent it and the answer "
     "returned as the upstream sent it ÷ the same with [server] passthrough = false (Messages → chat model → "
     "Messages and back, the path every request took before)"),
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- setup (stdlib only)

def _sha(*paths: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def _run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def _venv_with_requirements(venv: str, req: str, *, post: list[list[str]] | None = None,
                            installer: str = "pip", override: str | None = None) -> None:
    marker = os.path.join(venv, ".bench-installed")
    files = [req] + ([override] if override else [])
    want = _sha(*files) + ("-nosniffio" if post else "")
    if os.path.exists(marker) and open(marker).read().strip() == want:
        return
    py = shutil.which("python3") or sys.executable
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        _run([py, "-m", "venv", venv])
    vpy = os.path.join(venv, "bin", "python")
    if installer == "uv":
        uv = os.path.join(VENV_BENCH, "bin", "uv")
        cmd = [uv, "pip", "install", "--python", vpy, "-r", req]
        if override:
            cmd += ["--override", override]
        _run(cmd)
    else:
        _run([vpy, "-m", "pip", "install", "-q", "-r", req])
    for c in post or []:
        _run([vpy, "-m", *c])
    with open(marker, "w") as f:
        f.write(want)


def _apt_install(*pkgs: str) -> None:
    stamp = "/var/lib/apt/periodic/bench-updated"
    if not os.path.exists(stamp):
        _run(["apt-get", "update", "-qq"])
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        open(stamp, "w").close()
    _run(["apt-get", "install", "-y", "-qq", *pkgs], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def setup(need: set[str]) -> None:
    """Install what the selected proxies need. Idempotent; cheap when nothing changed."""
    _venv_with_requirements(VENV_BENCH, os.path.join(HERE, "requirements-bench.txt"))
    if "nosniffio" in need:
        _venv_with_requirements(VENV_NOSNIFF, os.path.join(HERE, "requirements-bench.txt"),
                                post=[["pip", "uninstall", "-y", "-q", "sniffio"]])
    if "litellm" in need:
        _venv_with_requirements(VENV_LITELLM, os.path.join(HERE, "requirements-litellm.txt"), installer="uv",
                                override=os.path.join(HERE, "overrides-litellm.txt"))
    if "portkey" in need:
        if not (shutil.which("node") and shutil.which("npm")):
            _apt_install("nodejs", "npm")
        marker = os.path.join(NODE_DIR, "node_modules", ".bench-installed")
        want = _sha(os.path.join(NODE_DIR, "package-lock.json"))
        if not (os.path.exists(marker) and open(marker).read().strip() == want):
            _run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR)
            with open(marker, "w") as f:
                f.write(want)


def bootstrap(argv: list[str]) -> None:
    """Run this script again inside bench/.venv-bench (creating it first if needed), in a session of its own.

    Its own session = its own scheduler autogroup, so --nice can raise the harness's priority
    without touching the caller's shell. Ctrl-C / SIGTERM are forwarded (the child then stops
    the proxy and the mock).
    """
    if os.environ.get("SCILLM_BENCH_CHILD") == "1":
        return
    _venv_with_requirements(VENV_BENCH, os.path.join(HERE, "requirements-bench.txt"))
    py = os.path.join(VENV_BENCH, "bin", "python")
    child = subprocess.Popen([py, os.path.abspath(__file__), *argv], start_new_session=True,
                             env={**os.environ, "SCILLM_BENCH_CHILD": "1"})

    def forward(*_):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    sys.exit(child.wait())


# --------------------------------------------------------------------------- /proc accounting

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()


def session_stats(sid: int) -> tuple[float, int, int]:
    """(cpu seconds, rss bytes, nprocs) summed over every live process of session `sid`.

    Proxies are started with start_new_session, so the session holds the proxy
    and all its descendants (workers, node threads are in-process). CPU is
    utime+stime plus cutime+cstime (children that already exited and were reaped).
    """
    cpu = 0
    rss = 0
    n = 0
    sid_b = str(sid).encode()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        f = _stat_fields(d)
        if f is None or f[3] != sid_b or f[0] == b"Z":
            continue
        n += 1
        cpu += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        rss += int(f[21]) * PAGE
    return cpu / CLK, rss, n


def task_cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of all threads of one process (/proc/PID/task/*/schedstat): precise, for the mock."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass
    except OSError:
        pass
    return total


def core_busy_s(core: int) -> float:
    """Busy seconds of one CPU core from /proc/stat (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{core} "):
                v = [int(x) for x in line.split()[1:]]
                return (sum(v[:8]) - v[3] - v[4]) / CLK
    return 0.0


def machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK


def wait_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Wait until the machine is nearly idle between runs (we share it with other work).

    Returns the busy fraction (of all cores) seen last; gives up after max_wait seconds.
    """
    deadline = time.time() + max_wait
    ncpu = os.cpu_count() or 1
    while True:
        b0, t0 = machine_busy_s(), time.perf_counter()
        time.sleep(0.5)
        busy = (machine_busy_s() - b0) / (time.perf_counter() - t0) / ncpu
        if busy < threshold or time.time() > deadline:
            return busy
        log(f"machine busy ({busy * 100:.0f}% of {ncpu} cores, not us) - waiting before the next run")
        time.sleep(2.0)


def calibrate() -> dict:
    """Single-core speed of this machine, so figures from different machines can be compared."""
    out = {}
    t = time.perf_counter()
    for _ in range(5):
        sum(range(10**6))
    out["python_sum_range_1e6_ms"] = round((time.perf_counter() - t) / 5 * 1000, 1)
    if shutil.which("node"):
        try:
            r = subprocess.run(["node", "-e", "let t=process.hrtime.bigint();let s=0;for(let i=0;i<1e8;i++)s+=i;"
                                "console.log(Number(process.hrtime.bigint()-t)/1e6)"],
                               capture_output=True, text=True, timeout=60)
            out["node_loop_1e8_ms"] = round(float(r.stdout.strip()), 1)
        except Exception:
            pass
    return out


# --------------------------------------------------------------------------- proxies

@dataclass
class Proxy:
    name: str
    label: str
    cmd: list[str]
    port: int
    ready_path: str
    headers: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = HERE
    missing: str | None = None  # reason it cannot run
    version: str = ""
    model: str = MODEL  # the "model" the load generator asks for
    messages: bool = False  # the load generator speaks Anthropic Messages to /v1/messages instead of chat
    setup: Any = None  # called with the proxy once it is ready (e.g. to create the key it is called with)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _version(py: str, dist: str) -> str:
    try:
        return subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return "?"


def make_proxies(workdir: str, transports: list[str], base_tree: str | None = None) -> dict[str, Proxy]:
    mock_v1 = f"http://127.0.0.1:{MOCK_PORT}/v1"
    auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
    out: dict[str, Proxy] = {}

    sc_version = None
    if os.access(SCILLM_BIN, os.X_OK):
        sc_version = _version(os.path.join(ROOT, ".venv", "bin", "python"), "scillm") or "dev"

    def scillm(name: str, label: str, extra_env: dict[str, str], model: str = MODEL, tree: str = ROOT,
               messages: bool = False) -> Proxy:
        data_dir = os.path.join(workdir, name + "-data")  # own state store per variant
        os.makedirs(data_dir, exist_ok=True)
        binary = os.path.join(tree, ".venv", "bin", "scillm")
        sc = Proxy(name, label, [binary, "serve", "--host", "127.0.0.1", "--port", str(PORTS[name])],
                   PORTS[name], "/health/readiness", auth, cwd=tree, model=model, messages=messages,
                   env={"OPENAI_API_KEY": "sk-bench", "OPENAI_API_BASE": mock_v1, "SCILLM_DATA_DIR": data_dir,
                        **extra_env})
        if not os.access(binary, os.X_OK):
            sc.missing = f"{binary} not found (the gateway is not installed in that tree's .venv)"
        else:
            sc.version = sc_version if tree == ROOT else (
                _version(os.path.join(tree, ".venv", "bin", "python"), "scillm") or "dev")
        return sc

    out["scillm"] = scillm("scillm", "scillm", {})
    out["scillm-nomw"] = scillm("scillm-nomw", "scillm, no middleware", {"SCILLM_DISABLE_PLUGINS": NOMW_PLUGINS})
    out["scillm-nokeys"] = scillm("scillm-nokeys", "scillm, keys and budgets off",
                                  {"SCILLM_DISABLE_PLUGINS": "keys,budgets"})
    keyed = out["scillm-keys"] = scillm("scillm-keys", "scillm, virtual key with budgets", {
        "SCILLM_CONFIG": os.path.join(workdir, "scillm-keys.toml")})
    with open(os.path.join(workdir, "scillm-keys.toml"), "w") as f:
        f.write("[budgets.teams.bench]\ndaily_usd = 1000000.0\nrpm = 1000000000\n")
    keyed.setup = _virtual_key
    typical = out["scillm-key"] = scillm("scillm-key", "scillm, virtual key with a daily budget", {})
    typical.setup = lambda proxy: _virtual_key(proxy, TYPICAL_KEY_LIMITS, team=None)
    # the anthropic provider posts to {ANTHROPIC_API_BASE}/v1/messages (a trailing /v1 on the base is tolerated)
    out["scillm-anthropic"] = scillm("scillm-anthropic", "scillm → Anthropic upstream",
                                     {"ANTHROPIC_API_KEY": "sk-bench",
                                      "ANTHROPIC_API_BASE": f"http://127.0.0.1:{MOCK_PORT}"}, model=ANTHROPIC_MODEL)
    # tracing on at sample ratio 1.0, exporting to the mock (which accepts OTLP/HTTP on /v1/traces, on the load core)
    tracing_toml = os.path.join(workdir, "tracing.toml")
    with open(tracing_toml, "w") as f:
        f.write(f'[tracing]\nenabled = true\nendpoint = "http://127.0.0.1:{MOCK_PORT}"\nsample_ratio = 1.0\n')
    out["scillm-tracing"] = scillm("scillm-tracing", "scillm, tracing on", {"SCILLM_CONFIG": tracing_toml})
    out["scillm-noui"] = scillm("scillm-noui", "scillm, no dashboard", {"SCILLM_DISABLE_PLUGINS": "ui"})
    if base_tree:
        out["scillm-before"] = scillm("scillm-before", f"scillm before ({os.path.basename(base_tree)})", {},
                                      tree=os.path.abspath(base_tree))
        out["scillm-before-tracing"] = scillm("scillm-before-tracing",
                                              f"scillm before ({os.path.basename(base_tree)}), tracing on",
                                              {"SCILLM_CONFIG": tracing_toml}, tree=os.path.abspath(base_tree))
        before_keys = out["scillm-before-keys"] = scillm(
            "scillm-before-keys", f"scillm before ({os.path.basename(base_tree)}), virtual key with budgets",
            {"SCILLM_CONFIG": os.path.join(workdir, "scillm-keys.toml")}, tree=os.path.abspath(base_tree))
        before_keys.setup = _virtual_key
    # Anthropic Messages in and out: the same-dialect pass-through, and the translated path (switched off)
    anthropic = {"ANTHROPIC_API_KEY": "sk-bench", "ANTHROPIC_API_BASE": f"http://127.0.0.1:{MOCK_PORT}"}
    translated = os.path.join(workdir, "scillm-translated.toml")
    with open(translated, "w") as f:
        f.write("[server]\npassthrough = false\n")
    out["scillm-messages"] = scillm("scillm-messages", "scillm, Messages in → Anthropic, as sent", anthropic,
                                    model=ANTHROPIC_MODEL, messages=True)
    out["scillm-messages-translated"] = scillm("scillm-messages-translated",
                                               "scillm, Messages in → Anthropic, translated",
                                               {**anthropic, "SCILLM_CONFIG": translated}, model=ANTHROPIC_MODEL,
                                               messages=True)

    cfg = os.path.join(workdir, "litellm.yaml")
    with open(cfg, "w") as f:
        f.write(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: {MODEL}\n"
            f"      api_base: {mock_v1}\n"
            "      api_key: sk-bench\n"
            "general_settings:\n"
            f"  master_key: {CLIENT_KEY}\n"
        )
    ll = Proxy("litellm", "LiteLLM",
               [os.path.join(VENV_LITELLM, "bin", "litellm"), "--config", cfg, "--host", "127.0.0.1",
                "--port", str(PORTS["litellm"]), "--num_workers", "1"],
               PORTS["litellm"], "/health/readiness", auth,
               env={"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MODE": "PRODUCTION"}, cwd=workdir)
    ll.version = _version(os.path.join(VENV_LITELLM, "bin", "python"), "litellm")
    out["litellm"] = ll

    pk = Proxy("portkey", "Portkey",
               ["node", os.path.join(NODE_DIR, "node_modules", "@portkey-ai", "gateway", "build", "start-server.js"),
                f"--port={PORTS['portkey']}", "--headless"],
               PORTS["portkey"], "/",
               {"x-portkey-provider": "openai", "x-portkey-custom-host": mock_v1, "Authorization": "Bearer sk-bench"},
               env={"NODE_ENV": "production"}, cwd=NODE_DIR)
    try:
        with open(os.path.join(NODE_DIR, "node_modules", "@portkey-ai", "gateway", "package.json")) as f:
            pk.version = json.load(f)["version"]
    except OSError:
        pk.version = "?"
    out["portkey"] = pk

    def bare(name: str, label: str, venv: str, transport: str) -> Proxy:
        return Proxy(name, label,
                     [os.path.join(venv, "bin", "python"), "-m", "uvicorn", "passthrough:app", "--host", "127.0.0.1",
                      "--port", str(PORTS["bare"]), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                      "--log-level", "warning"],
                     PORTS["bare"], "/health", auth,
                     env={"BENCH_UPSTREAM": mock_v1, "BENCH_TRANSPORT": transport}, cwd=HERE,
                     version=f"starlette {_version(os.path.join(VENV_BENCH, 'bin', 'python'), 'starlette')}, "
                             f"transport={transport}")

    out["bare"] = bare("bare", "bare Starlette+httpx", VENV_BENCH, "httpx")
    variants = {
        "httpx+sniffio": (VENV_BENCH, "httpx"),
        "httpx-no-sniffio": (VENV_NOSNIFF, "httpx"),
        "httpx-aiohttp": (VENV_BENCH, "httpx-aiohttp"),
        "httpx2": (VENV_BENCH, "httpx2"),
    }
    for t in transports:
        venv, tr = variants[t]
        out[f"bare[{t}]"] = bare(f"bare[{t}]", f"bare / {t}", venv, tr)
    return out


# --------------------------------------------------------------------------- scenarios

@dataclass
class Scenario:
    name: str
    title: str
    stream: bool
    concurrency: int
    delay_ms: int


SCENARIOS = [
    Scenario("nonstream_c1", "non-streaming, c=1", False, 1, 0),
    Scenario("nonstream_c64", "non-streaming, c=64", False, 64, 0),
    Scenario("stream_c64", "streaming, c=64", True, 64, 0),
    Scenario("inflight256", "256 in flight, upstream delay 100 ms", False, 256, 100),
]
TRANSPORT_SCENARIOS = ["nonstream_c64", "stream_c64", "inflight256"]


# --------------------------------------------------------------------------- running


def _virtual_key(proxy: Proxy, limits: dict | None = None, team: str | None = "bench") -> None:
    """Create a virtual key (by default: team "bench", every limit) with the admin key and call with it from now on."""
    import urllib.request

    body = json.dumps({"name": "bench", "team": team, "limits": limits or KEY_LIMITS}).encode()
    req = urllib.request.Request(proxy.base + "/v1/scillm/keys", data=body, method="POST", headers={
        "authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        proxy.headers = {"Authorization": f"Bearer {json.loads(resp.read())['key']}"}


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:
        return 0, b""


def http_post(url: str) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url, data=b"", method="POST"), timeout=5) as r:
        r.read()


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith(("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH"))}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


NICE = 0  # set from --nice


def _pin(core: int):
    def f():
        os.sched_setaffinity(0, {core})
        if NICE:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, NICE)
            except OSError:
                pass
            # With sched_autogroup (on by default), nice only ranks processes of the same session;
            # between sessions the autogroup's own nice counts. Proxies, the mock and the harness
            # (see bootstrap) each have a session of their own, so this touches nothing else.
            try:
                with open("/proc/self/autogroup", "w") as ag:
                    ag.write(str(NICE))
            except OSError:
                pass
    return f


def start_mock(logdir: str) -> subprocess.Popen:
    logf = open(os.path.join(logdir, "mock.log"), "wb")
    p = subprocess.Popen([os.path.join(VENV_BENCH, "bin", "python"), os.path.join(HERE, "mock.py"),
                          "--port", str(MOCK_PORT)], stdout=logf, stderr=subprocess.STDOUT,
                         env=clean_env({}), preexec_fn=_pin(LOAD_CORE), start_new_session=True)
    deadline = time.time() + 15
    while time.time() < deadline:
        if http_get(f"http://127.0.0.1:{MOCK_PORT}/health")[0] == 200:
            time.sleep(0.2)
            if p.poll() is None:  # ours answered, not another bench's mock on the same port
                return p
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"mock failed to start, see {logdir}/mock.log")


def mock_stats() -> dict:
    st, raw = http_get(f"http://127.0.0.1:{MOCK_PORT}/__mock/stats")
    return json.loads(raw) if st == 200 else {}


def set_delay(ms: int) -> None:
    http_post(f"http://127.0.0.1:{MOCK_PORT}/__mock/delay?ms={ms}")


def stop_group(p: subprocess.Popen, grace: float = 10.0) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)


def tail(path: str, n: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
    except OSError:
        return ""


async def load_with_sampling(proxy: Proxy, pid: int, stream: bool, concurrency: int, duration: float,
                             max_requests: int | None = None, timeout: float = 30.0) -> dict:
    import asyncio

    from loadgen import chat_body, messages_body, run_load

    body = json.dumps((messages_body if proxy.messages else chat_body)(proxy.model, stream)).encode()
    peak = [0]

    async def sampler():
        while True:
            peak[0] = max(peak[0], session_stats(pid)[1])
            await asyncio.sleep(0.25)

    task = asyncio.ensure_future(sampler())
    try:
        path = "/v1/messages" if proxy.messages else "/v1/chat/completions"
        res = await run_load(proxy.base + path, proxy.headers, body, concurrency=concurrency, duration=duration,
                             max_requests=max_requests, stream=stream, timeout=timeout, messages=proxy.messages)
    finally:
        task.cancel()
    res["peak_rss"] = max(peak[0], session_stats(pid)[1])
    return res


def measured_run(proxy: Proxy, pid: int, mock_pid: int, sc: Scenario, duration: float,
                 quiet_wait: float) -> dict:
    import uvloop

    if quiet_wait > 0:
        wait_quiet(quiet_wait)
    set_delay(sc.delay_ms)
    u0 = mock_stats()
    c0, _, _ = session_stats(pid)
    b0 = core_busy_s(PROXY_CORE)
    m0 = task_cpu_ns(mock_pid)
    t0 = os.times()
    res = uvloop.run(load_with_sampling(proxy, pid, sc.stream, sc.concurrency, duration))
    t1 = os.times()
    c1, _, _ = session_stats(pid)
    b1 = core_busy_s(PROXY_CORE)
    m1 = task_cpu_ns(mock_pid)
    u1 = mock_stats()
    set_delay(0)
    # what reached the mock: upstream calls, and of those POST /v1/messages (Anthropic wire format)
    res["upstream_calls"] = u1.get("requests", 0) - u0.get("requests", 0)
    res["upstream_messages_calls"] = u1.get("messages", 0) - u0.get("messages", 0)
    done = max(res["ok"], 1)
    res["proxy_cpu_s"] = round(c1 - c0, 3)
    res["cpu_us_per_req"] = round((c1 - c0) / done * 1e6, 1) if res["ok"] else None
    res["mock_cpu_us_per_req"] = round((m1 - m0) / done / 1e3, 1) if res["ok"] else None
    lg = (t1.user - t0.user) + (t1.system - t0.system)
    res["load_core_util"] = round((lg + (m1 - m0) / 1e9) / res["elapsed_s"], 3)
    res["loadgen_cpu_us_per_req"] = round(lg / done * 1e6, 1) if res["ok"] else None
    res["proxy_core_util"] = round((c1 - c0) / res["elapsed_s"], 3)
    # busy time on the proxy's core not accounted to the proxy: other programs on this box, or
    # kernel work (softirq) for the proxy's sockets. Large values mean a noisy run.
    res["core0_other_util"] = round(max(0.0, (b1 - b0) - (c1 - c0)) / res["elapsed_s"], 3)
    return res


def start_proxy(proxy: Proxy, logf, logpath: str) -> tuple[subprocess.Popen, bool, float]:
    """Spawn the proxy pinned to PROXY_CORE in a session of its own; poll readiness every 20 ms (up to 120 s).

    Returns (process, ready, seconds from spawn to the first 200 of the readiness URL)."""
    log(f"starting {proxy.label} on :{proxy.port} (core {PROXY_CORE}); log {logpath}")
    t0 = time.perf_counter()
    p = subprocess.Popen(proxy.cmd, cwd=proxy.cwd, env=clean_env(proxy.env), stdout=logf, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, preexec_fn=_pin(PROXY_CORE), start_new_session=True)
    ready = False
    deadline = t0 + 120
    while time.perf_counter() < deadline:
        if p.poll() is not None:
            break
        if http_get(proxy.base + proxy.ready_path, timeout=1.0)[0] == 200:
            ready = True
            break
        time.sleep(0.02)
    return p, ready, time.perf_counter() - t0


def bench_proxy(proxy: Proxy, scenarios: list[Scenario], runs: int, duration: float, logdir: str,
                mock_pid: int, warmup: float, quiet_wait: float = 60.0) -> dict:
    import uvloop

    out: dict = {"name": proxy.name, "label": proxy.label, "version": proxy.version, "cmd": proxy.cmd}
    if proxy.missing:
        log(f"SKIP {proxy.label}: {proxy.missing}")
        out["skipped"] = proxy.missing
        return out
    logpath = os.path.join(logdir, proxy.name.replace("/", "_") + ".log")
    logf = open(logpath, "wb")
    set_delay(0)
    p, ready, startup = start_proxy(proxy, logf, logpath)
    try:
        if not ready:
            out["failed"] = f"not ready after {startup:.1f}s (exit={p.poll()}); log tail:\n{tail(logpath)}"
            log(f"FAIL {proxy.label}: {out['failed']}")
            return out
        out["startup_s"] = round(startup, 3)
        if proxy.setup is not None:
            proxy.setup(proxy)
        time.sleep(1.0)
        _, idle_rss, nprocs = session_stats(p.pid)
        out["idle_rss_mb"] = round(idle_rss / 2**20, 1)
        out["nprocs"] = nprocs
        log(f"{proxy.label} ready in {startup:.2f}s, idle RSS {idle_rss / 2**20:.0f} MB ({nprocs} procs)")

        # correctness probe: one request of each kind must succeed
        for stream in (False, True):
            r = uvloop.run(load_with_sampling(proxy, p.pid, stream, 1, 30.0, max_requests=1))
            if r["ok"] != 1:
                out["failed"] = (f"probe ({'stream' if stream else 'non-stream'}) failed: {r['error_kinds']} "
                                 f"timeouts={r['timeouts']}; log tail:\n{tail(logpath)}")
                log(f"FAIL {proxy.label}: {out['failed']}")
                return out
        if warmup > 0:
            uvloop.run(load_with_sampling(proxy, p.pid, False, 8, warmup))
            uvloop.run(load_with_sampling(proxy, p.pid, True, 8, warmup / 2))
        peak = idle_rss
        out["scenarios"] = {}
        for sc in scenarios:
            rs = []
            for i in range(runs):
                r = measured_run(proxy, p.pid, mock_pid, sc, duration, quiet_wait)
                peak = max(peak, r["peak_rss"])
                rs.append(r)
                log(f"{proxy.label:>24} {sc.name:<14} run {i + 1}: {r['rps']:>8.1f} req/s  p50 {r['p50_ms']} ms  "
                    f"p99 {r['p99_ms']} ms  ttfb50 {r['ttfb_p50_ms']}  cpu {r['cpu_us_per_req']} us/req  "
                    f"err {r['errors']} to {r['timeouts']}  (mock {r['mock_cpu_us_per_req']} us/req, "
                    f"loadgen {r['loadgen_cpu_us_per_req']} us/req)")
                time.sleep(0.3)
            out["scenarios"][sc.name] = rs
        out["peak_rss_mb"] = round(peak / 2**20, 1)
        if p.poll() is not None:
            out["failed"] = f"proxy exited during the run (exit={p.returncode})"
        return out
    finally:
        stop_group(p)
        logf.close()


def merge_rounds(acc: dict | None, r: dict) -> dict:
    """Fold one interleaved round into the proxy's result: runs appended, startup/idle RSS = mean, peak = max."""
    if acc is None:
        r = dict(r)
        for k in ("startup_s", "idle_rss_mb"):
            if k in r:
                r[k + "_all"] = [r[k]]
        return r
    if r.get("failed") and not acc.get("failed"):
        acc["failed"] = r["failed"]
    for k in ("startup_s", "idle_rss_mb"):
        if k in r:
            acc.setdefault(k + "_all", []).append(r[k])
            acc[k] = round(sum(acc[k + "_all"]) / len(acc[k + "_all"]), 3)
    if "peak_rss_mb" in r:
        acc["peak_rss_mb"] = max(acc.get("peak_rss_mb") or 0, r["peak_rss_mb"])
    for sc, runs in r.get("scenarios", {}).items():
        acc.setdefault("scenarios", {}).setdefault(sc, []).extend(runs)
    return acc


# --------------------------------------------------------------------------- report

def _mean(vals):
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def _median(vals):
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, int) or (isinstance(v, float) and v >= 1000):
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def render_markdown(meta: dict, results: dict[str, dict], scenarios: list[Scenario]) -> str:
    L = []
    L.append(f"### Results {meta['timestamp']}")
    L.append("")
    L.append(f"Machine: {meta['cpu']} ({meta['cores']} cores); proxy pinned to core {PROXY_CORE}, mock + load "
             f"generator to core {LOAD_CORE}. {meta['runs']} runs × {meta['duration']} s per scenario, "
             f"{meta['warmup']} s warm-up per proxy, nice {NICE}. Single-core speed: "
             + ", ".join(f"{k} = {v}" for k, v in meta["calibration"].items()) + ".")
    L.append("")
    L.append("Versions: " + "; ".join(f"{r['label']} {r.get('version') or ''}".strip() for r in results.values()))
    L.append("")
    for r in results.values():
        if r.get("skipped"):
            L.append(f"- **{r['label']}: not measured** — {r['skipped']}")
        elif r.get("failed"):
            L.append(f"- **{r['label']}: failed** — {r['failed'].splitlines()[0]}")
    L.append("")
    ok = {k: v for k, v in results.items() if v.get("scenarios")}

    # startup / memory
    L.append("#### Start-up and memory (all processes of the proxy summed)")
    L.append("")
    L.append("| proxy | startup s | idle RSS MB | peak RSS MB | startup vs anchors | peak RSS vs anchors |")
    L.append("|---|---:|---:|---:|---|---|")

    def k_start(r):
        return r.get("startup_s")

    def k_peak(r):
        return r.get("peak_rss_mb")

    for name, r in results.items():
        if "startup_s" not in r:
            continue
        L.append(f"| {r['label']} | {_fmt(r.get('startup_s'), 2)} | {_fmt(r.get('idle_rss_mb'), 0)} | "
                 f"{_fmt(r.get('peak_rss_mb'), 0)} | {_ratio(name, r.get('startup_s'), ok, k_start)} | "
                 f"{_ratio(name, r.get('peak_rss_mb'), ok, k_peak)} |")
    L.append("")

    for sc in scenarios:
        rows = [(n, r) for n, r in ok.items() if sc.name in r["scenarios"]]
        if not rows:
            continue
        L.append(f"#### {sc.title}")
        L.append("")
        ttfb = sc.stream
        hdr = ("| proxy | run | req/s | p50 ms | p99 ms |" + (" TTFB p50 ms | TTFB p99 ms |" if ttfb else "")
               + " ok | errors | timeouts | CPU µs/req | proxy core use | other use of proxy core"
               + " | load core use | mock µs/req |")
        L.append(hdr)
        L.append("|" + "---|" * 2 + "---:|" * (hdr.count("|") - 3))
        for _, r in rows:
            for i, x in enumerate(r["scenarios"][sc.name]):
                cells = [r["label"], str(i + 1), _fmt(x["rps"]), _fmt(x["p50_ms"], 2), _fmt(x["p99_ms"], 2)]
                if ttfb:
                    cells += [_fmt(x["ttfb_p50_ms"], 2), _fmt(x["ttfb_p99_ms"], 2)]
                errs = str(x["errors"]) + (f" {x['error_kinds']}" if x["errors"] else "")
                if x.get("core0_other_util", 0) > 0.10:
                    cells[1] += " ⚠"
                cells += [str(x["ok"]), errs, str(x["timeouts"]), _fmt(x["cpu_us_per_req"], 0),
                          f"{x['proxy_core_util'] * 100:.0f}%", f"{x.get('core0_other_util', 0) * 100:.0f}%",
                          f"{x['load_core_util'] * 100:.0f}%",
                          _fmt(x["mock_cpu_us_per_req"], 0)]
                L.append("| " + " | ".join(cells) + " |")
        L.append("")
        if any(x.get("core0_other_util", 0) > 0.10 for _, r in rows for x in r["scenarios"][sc.name]):
            L.append("⚠ = more than 10% of the proxy's core was busy with other work during the run: noisy figure.")
            L.append("")
        # ratios (mean of runs)
        metrics = [("req/s", "rps"), ("p50", "p50_ms"), ("p99", "p99_ms")]
        if ttfb:
            metrics += [("TTFB p50", "ttfb_p50_ms"), ("TTFB p99", "ttfb_p99_ms")]
        metrics += [("CPU µs/req", "cpu_us_per_req")]
        if not any(a in ok for a in ANCHORS):
            continue  # no anchor measured: nothing to divide by (scillm variants have their own table below)
        L.append("Ratios to each anchor (mean of runs; for req/s higher is better, for the rest lower is better):")
        L.append("")
        L.append("| proxy | " + " | ".join(m for m, _ in metrics) + " |")
        L.append("|---|" + "---|" * len(metrics))
        for n, r in rows:
            cells = [r["label"]]
            for _, key in metrics:
                def kf(rr, key=key, sc=sc):
                    xs = rr.get("scenarios", {}).get(sc.name)
                    return _mean([x[key] for x in xs]) if xs else None
                cells.append(_ratio(n, kf(r), ok, kf))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
    v = render_variants(ok, scenarios)
    if v:
        L.append(v)
    return "\n".join(L)


def render_variants(ok: dict[str, dict], scenarios: list[Scenario]) -> str:
    """scillm-vs-scillm ratios (VARIANT_PAIRS) for every pair whose two rows were both measured."""
    pairs = [vp for vp in VARIANT_PAIRS if vp[0] in ok and vp[1] in ok]
    if not pairs:
        return ""
    L = ["#### scillm variants (ratios of the medians of runs; per round: run k of one row ÷ run k of the other)", ""]
    for subj, base, _, meaning in pairs:
        L.append(f"- **{ok[subj]['label']} ÷ {ok[base]['label']}**: {meaning}")
    L.append("")
    L.append("| comparison | scenario | CPU µs/req | CPU µs/req per run (subject vs base) | CPU per round | req/s "
             "| p50 | p99 | TTFB p50 |")
    L.append("|---|---|---:|---|---|---:|---:|---:|---:|")

    def mean(r, sc, key):  # the median of the runs
        return _median([x[key] for x in r["scenarios"].get(sc, [])])

    def q(a, b):
        return f"{a / b:.2f}×" if a is not None and b else "–"

    for subj, base, title, _ in pairs:
        a, b = ok[subj], ok[base]
        for sc in scenarios:
            if sc.name not in a["scenarios"] or sc.name not in b["scenarios"]:
                continue
            noisy = any(x.get("core0_other_util", 0) > 0.10
                        for r in (a, b) for x in r["scenarios"][sc.name])
            runs = (" / ".join(_fmt(x["cpu_us_per_req"], 0) for x in a["scenarios"][sc.name]) + " vs "
                    + " / ".join(_fmt(x["cpu_us_per_req"], 0) for x in b["scenarios"][sc.name]))
            rounds = " / ".join(q(x["cpu_us_per_req"], y["cpu_us_per_req"])
                                for x, y in zip(a["scenarios"][sc.name], b["scenarios"][sc.name], strict=False))
            cells = [title, sc.title + (" ⚠" if noisy else ""),
                     "**" + q(mean(a, sc.name, "cpu_us_per_req"), mean(b, sc.name, "cpu_us_per_req")) + "**", runs,
                     rounds,
                     q(mean(a, sc.name, "rps"), mean(b, sc.name, "rps")),
                     q(mean(a, sc.name, "p50_ms"), mean(b, sc.name, "p50_ms")),
                     q(mean(a, sc.name, "p99_ms"), mean(b, sc.name, "p99_ms")),
                     q(mean(a, sc.name, "ttfb_p50_ms"), mean(b, sc.name, "ttfb_p50_ms")) if sc.stream else "–"]
            L.append("| " + " | ".join(cells) + " |")
        cells = [title, "startup s / peak RSS", q(a.get("startup_s"), b.get("startup_s")) + " / "
                 + q(a.get("peak_rss_mb"), b.get("peak_rss_mb")), "", "", "", "", "", ""]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if any("⚠" in line for line in L):
        L.append("⚠ = a run of either row had more than 10% of the proxy's core busy with other work.")
        L.append("")
    return "\n".join(L)


def _ratio(name, val, ok, kf):
    parts = []
    for a in ANCHORS:
        if a == name or a not in ok:
            continue
        av = kf(ok[a])
        if val is None or not av:
            continue
        parts.append(f"{val / av:.2f}× {ANCHOR_ABBR[a]}")
    return " · ".join(parts) if parts else "–"


def render_transport_table(results: dict[str, dict], scenarios: list[Scenario]) -> str:
    L = ["| transport | " + " | ".join(f"{s.name} CPU µs/req | {s.name} req/s | {s.name} p99 ms" for s in scenarios)
         + " | errors+timeouts |",
         "|---|" + "---:|" * (3 * len(scenarios) + 1)]
    for n, r in results.items():
        if not n.startswith("bare["):
            continue
        if not r.get("scenarios"):
            L.append(f"| {n[5:-1]} | " + " | ".join(["–"] * (3 * len(scenarios))) +
                     f" | {r.get('failed') or r.get('skipped')} |")
            continue
        cells = [n[5:-1]]
        errs = 0
        for s in scenarios:
            xs = r["scenarios"].get(s.name, [])
            cpu = " / ".join(_fmt(x["cpu_us_per_req"], 0) for x in xs)
            rps = " / ".join(_fmt(x["rps"]) for x in xs)
            p99 = " / ".join(_fmt(x["p99_ms"], 1) for x in xs)
            errs += sum(x["errors"] + x["timeouts"] for x in xs)
            cells += [cpu, rps, p99]
        cells.append(str(errs))
        L.append("| " + " | ".join(cells) + " |")
    return "\n".join(L)


def update_readme(block: str, text: str) -> None:
    path = os.path.join(HERE, "README.md")
    with open(path) as f:
        doc = f.read()
    start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
    if start not in doc or end not in doc:
        log(f"README has no {start} markers; not updated")
        return
    a = doc.index(start) + len(start)
    b = doc.index(end)
    doc = doc[:a] + "\n" + text.strip() + "\n" + doc[b:]
    with open(path, "w") as f:
        f.write(doc)
    log(f"README.md block '{block}' updated")


# --------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxies", default=None,
                    help="comma list of scillm,litellm,portkey,bare,scillm-nomw,scillm-anthropic,scillm-tracing,"
                         "scillm-before,scillm-before-tracing,scillm-messages,scillm-messages-translated,scillm-noui,"
                         "scillm-keys,scillm-key,"
                         "scillm-nokeys,scillm-before-keys "
                         "(default: scillm,litellm,portkey,bare; with --batch: scillm)")
    ap.add_argument("--base-tree", default=None,
                    help="a checkout with its own .venv (e.g. a worktree of main) run as the scillm-before row")
    ap.add_argument("--batch", action="store_true",
                    help="instead: batch throughput (bench/batch.py): one POST /v1/scillm/batch/completions "
                         "per run against a mock answering after --batch-delay-ms; proxies: scillm variants")
    ap.add_argument("--batch-items", type=int, default=640, help="items per batch (default 640)")
    ap.add_argument("--batch-concurrency", type=int, default=64, help="batch \"concurrency\" (default 64)")
    ap.add_argument("--batch-delay-ms", type=int, default=100, help="mock answer delay for --batch (default 100)")
    ap.add_argument("--transports", action="store_true",
                    help="instead: bare pass-through once per HTTP client transport "
                         "(httpx+sniffio, httpx-no-sniffio, httpx-aiohttp, httpx2)")
    ap.add_argument("--transport-list", default="httpx+sniffio,httpx-no-sniffio,httpx-aiohttp,httpx2")
    ap.add_argument("--scenarios", default=None,
                    help="comma list of " + ",".join(s.name for s in SCENARIOS) + " (default: all; "
                         "with --transports: " + ",".join(TRANSPORT_SCENARIOS) + ")")
    ap.add_argument("--runs", type=int, default=2, help="runs per scenario (default 2)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per proxy (default 3)")
    ap.add_argument("--interleave", action="store_true",
                    help="run 1 of every proxy, then run 2 of every proxy, ... (each round restarts the proxy); "
                         "default with --transports")
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 run × 3 s, 1 s warm-up")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each run wait up to this many seconds for other programs on the box to go "
                         "idle (default 60; 0 = don't wait)")
    ap.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                    help="scheduling priority for proxy, mock and load generator (default -10 as root, so "
                         "other work on a shared box disturbs the runs less; 0 = leave alone)")
    ap.add_argument("--setup-only", action="store_true", help="install everything and exit")
    ap.add_argument("--no-setup", action="store_true", help="do not install anything")
    ap.add_argument("--update-readme", action="store_true",
                    help="write the results table into bench/README.md")
    ap.add_argument("--readme-block", default=None,
                    help="with --update-readme: the <!-- NAME:start/end --> block to replace (default: results; "
                         "transports with --transports; batch with --batch; e.g. variants for the scillm variant rows)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.warmup = 1, 3.0, 1.0

    if args.transports:
        args.interleave = True
        transports = [t for t in args.transport_list.split(",") if t]
        names = [f"bare[{t}]" for t in transports]
        sc_names = (args.scenarios or ",".join(TRANSPORT_SCENARIOS)).split(",")
    else:
        transports = []
        names = [n for n in (args.proxies or ("scillm" if args.batch else "scillm,litellm,portkey,bare")).split(",")
                 if n]
        sc_names = (args.scenarios or ",".join(s.name for s in SCENARIOS)).split(",")
    scenarios = [s for s in SCENARIOS if s.name in sc_names]
    if not scenarios:
        ap.error("no known scenario selected")

    if not args.no_setup:
        need = set(names)
        if "httpx-no-sniffio" in transports:
            need.add("nosniffio")
        setup(need)
    if args.setup_only:
        log("setup done")
        return 0

    def _term(*_):
        raise KeyboardInterrupt  # so the finally blocks stop the proxy and the mock

    signal.signal(signal.SIGTERM, _term)
    global NICE
    NICE = args.nice
    _pin(LOAD_CORE)()
    sys.path.insert(0, HERE)
    ts = time.strftime("%Y%m%d-%H%M%S")
    workdir = tempfile.mkdtemp(prefix=f"scillm-bench-{ts}-")
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir)
    proxies = make_proxies(workdir, transports, args.base_tree)
    for n in names:
        if n not in proxies:
            ap.error(f"unknown proxy {n}")
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    meta = {"timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": args.runs, "duration": args.duration,
            "warmup": args.warmup, "interleave": args.interleave, "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(),
            "mode": "transports" if args.transports else "proxies", "workdir": workdir,
            "calibration": calibrate()}
    log(f"work dir {workdir}")
    mock = start_mock(logdir)
    if args.batch:
        import batch

        try:
            for n in names:
                if not n.startswith("scillm"):
                    ap.error(f"--batch measures scillm variants only, not {n}")
            return batch.main(sys.modules[__name__], args, meta, [proxies[n] for n in names], logdir, mock, ts)
        finally:
            stop_group(mock)
    results: dict[str, dict] = {}
    try:
        if args.interleave:
            # round r: every proxy once (fresh start), so drift in machine load hits all alike
            for _ in range(args.runs):
                for n in names:
                    r = bench_proxy(proxies[n], scenarios, 1, args.duration, logdir, mock.pid, args.warmup,
                                    args.quiet_wait)
                    results[n] = merge_rounds(results.get(n), r)
        else:
            for n in names:
                results[n] = bench_proxy(proxies[n], scenarios, args.runs, args.duration, logdir, mock.pid,
                                         args.warmup, args.quiet_wait)
    finally:
        stop_group(mock)

    md = render_markdown(meta, results, scenarios)
    if args.transports:
        md += "\n#### Transport summary (run 1 / run 2)\n\n" + render_transport_table(results, scenarios) + "\n"
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = os.path.join(RESULTS_DIR, ts + ("-transports" if args.transports else ""))
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(md)
    log(f"wrote {stem}.md and {stem}.json; proxy logs in {logdir}")
    if args.update_readme:
        update_readme(args.readme_block or ("transports" if args.transports else "results"), md)
    return 0


if __name__ == "__main__":
    bootstrap(sys.argv[1:])
    sys.exit(main(sys.argv[1:]))
