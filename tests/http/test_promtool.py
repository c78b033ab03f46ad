"""`promtool check metrics` (Prometheus' own linter, from Debian's `prometheus` package) on
what `remask serve`'s `/metrics` and a worker's `--metrics-listen` serve after real requests.

It finds exactly one thing, kept on purpose: "metric names should not contain ':'" for the
`remask:` names, vLLM's naming (`vllm:...`) that remask follows so vLLM's dashboards work with
the prefix changed (crates/remask-cluster/src/metrics.rs says why). Any other finding, or
that one on a name without the `remask:` prefix, fails. Also: the format is negotiated
(OpenMetrics when the Accept header asks for it, as Prometheus does; the text format 0.0.4
otherwise), with the same samples in both. A missing promtool skips locally and fails under
REMASK_REQUIRE_TOOLS=1 (scripts/test.sh).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import child_env, free_port, require_executable  # noqa: E402

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
# The one finding allowed, and only on these names.
ALLOWED = re.compile(r"^(remask:[a-z0-9_]+) metric names should not contain ':'$")


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_executable("promtool", "apt-get install prometheus (Debian's package ships promtool)")


def lint(promtool: str, text: str) -> list[str]:
    """promtool's findings: one line each."""
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                         timeout=60)
    findings = [line.strip() for line in (res.stdout + res.stderr).splitlines() if line.strip()]
    assert (res.returncode == 0) == (not findings), (res.returncode, findings)
    return findings


def check(promtool: str, text: str) -> None:
    findings = lint(promtool, text)
    unexpected = [f for f in findings if not ALLOWED.match(f)]
    assert not unexpected, "promtool check metrics:\n" + "\n".join(unexpected)
    names = {l.split()[2] for l in text.splitlines() if l.startswith("# TYPE ")}
    # the colon finding is there for every remask: metric, and for nothing else
    assert {ALLOWED.match(f).group(1) for f in findings} == {n for n in names if n.startswith("remask:")}


def samples(text: str) -> list[str]:
    return [l for l in text.splitlines() if l and not l.startswith("#")]


def test_serve_metrics_pass_promtool(promtool, open_server, model_id):
    r = requests.post(f"{open_server.base_url}/completions", timeout=60,
                      json={"model": model_id, "prompt": "Hello world", "max_tokens": 8, "steps": 8})
    assert r.status_code == 200, r.text
    plain = requests.get(f"{open_server.http_url}/metrics", timeout=10)
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = plain.text
    # the request shows: counters, histograms, gauges, the process
    for name in ("remask:prompt_tokens_total", "remask:request_success_total",
                 "remask:e2e_request_latency_seconds_bucket", "remask:num_requests_running",
                 "process_cpu_seconds_total", "remask:build_info"):
        assert re.search(rf"^{re.escape(name)}[{{ ]", text, re.M), name
    assert "# TYPE remask:prompt_tokens_total counter" in text and "# EOF" not in text
    check(promtool, text)

    om = requests.get(f"{open_server.http_url}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10)
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert om.text.endswith("# EOF\n") and "# TYPE remask:prompt_tokens counter" in om.text
    # the same samples (process metrics move between two scrapes: compare the names)
    assert [s.split(" ")[0] for s in samples(om.text)] == [s.split(" ")[0] for s in samples(text)]


def test_worker_metrics_pass_promtool(promtool, bin_path, cache_dir, tmp_path):
    port, mport = free_port(), free_port()
    log = open(tmp_path / "worker.log", "wb")
    proc = subprocess.Popen([str(bin_path), "worker", "--listen", f"127.0.0.1:{port}", "--id", "w0",
                             "--metrics-listen", f"127.0.0.1:{mport}"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env(cache_dir))
    log.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                r = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=2)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                time.sleep(0.1)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "process_cpu_seconds_total" in r.text
        check(promtool, r.text)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
