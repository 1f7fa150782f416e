"""Soak: `specialist serve` with a shadow arm and a scrubbed, bounded request log under steady mixed traffic for
20 minutes; does its memory stay flat and does every request get the answer it should?

    .venv/bin/python bench/serve_soak.py [RUN] [--shadow RUN] [--minutes 20] [--rate 3] [--work DIR]

Starts the real server as a child process (`specialist serve --arm tuned=RUN --shadow next=SHADOW --log-prompts
--scrub-logs --log-max-rows 1000`), so what is measured is the process a user runs. Without RUN it builds the test
suite's tiny model (2-layer random Llama, tests/conftest.py) and trains the same 2-step LoRA run as the
`tiny_run_dir` fixture, and the shadow is that run with its adapter scrambled (so it disagrees); nothing is
downloaded. One client thread sends `--rate` requests a second, paced, never in bursts, in a fixed mix: chat
completions, streamed chat (with usage), text completions, feedback on recent answers, bad requests (invalid JSON,
unknown model, unsupported field, out-of-range values: each must be a 4xx), /metrics and /health; every
`--harvest-every` seconds `specialist harvest` reads the live log from another process. The server's RSS, open file
descriptors and threads are read from /proc every `--sample-s` seconds.

Figures: requests sent, errors (5xx, connection failures, streams that end without [DONE] or with an error event,
a failed harvest), unexpected statuses (a good request refused or a bad one accepted), RSS after the warm-up, at
its highest and at the end, and the growth; then per minute: requests, errors, latency p50/p99, RSS, descriptors,
threads. The server is stopped with SIGTERM at the end and must exit 0. Figures go to bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "soak.json"
LOG_LINES = (  # loghub-like lines with a hole for a varying number, and some personal data for --scrub-logs
    "081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder {n} for block blk_{n} terminating",
    "Dec 10 06:55:46 LabSZ sshd[{n}]: Invalid user webmaster from 173.234.31.{m}",
    "[Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok /etc/httpd/conf/workers{n}.properties",
    "Jun 14 15:16:01 combo sshd(pam_unix)[{n}]: authentication failure; user=bob{m}@example.com rhost=10.0.0.{m}",
    "kernel: usb {m}-1: new high-speed USB device number {n} using ehci_hcd",
)
# the fixed traffic mix: each second's requests are drawn in this proportion (weights out of 20)
MIX = (("chat", 7), ("stream", 4), ("completion", 2), ("feedback", 2), ("bad", 4), ("metrics", 1))


# ---- the run to serve ------------------------------------------------------------------------------------------


def tiny_runs(work: Path) -> tuple[Path, Path]:
    """The tiny run (tests/conftest.py's model, the tiny_run_dir fixture's 2-step training) and a shadow copy with a
    scrambled adapter, made once under `work`. Imported from the tests so the soak serves what CI serves."""
    live, shadow = work / "runs" / "tiny", work / "runs" / "shadow"
    if (live / "adapter").is_dir() and (shadow / "adapter").is_dir():
        return live, shadow
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer, train_tiny_run

    model_dir = work / "tiny-model"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train_tiny_run(model_dir, work)
    scrambled_copy(live, shadow)
    return live, shadow


def scrambled_copy(run: Path, folder: Path) -> None:
    """`run` copied with random adapter weights: a candidate on the same base that answers differently."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoints"), dirs_exist_ok=True)
    weights = folder / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(7)
    save_file({name: torch.randn(t.shape, generator=generator) for name, t in load_file(weights).items()}, weights)


# ---- the server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def specialist_command() -> list[str]:
    """The `specialist` script of this interpreter's environment, or the same entry point through -c."""
    script = Path(sys.executable).parent / "specialist"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from specialist.cli import app; app()"]


def start_server(live: Path, shadow: Path, work: Path, port: int) -> subprocess.Popen:
    db = work / "serve.sqlite"
    for stale in work.glob("serve.sqlite*"):  # a fresh log each soak: an old one would skew the size
        stale.unlink()
    command = [*specialist_command(), "serve", "--arm", f"tuned={live}", "--shadow", f"next={shadow}",
               "--shadow-share", "0.5", "--log-prompts", "--scrub-logs", "--log-max-rows", "1000",
               "--db", str(db), "--port", str(port), "--max-tokens", "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    with open(work / "server.log", "w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see {work / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not answer /health within 300 s")


def process_figures(pid: int) -> dict[str, float]:
    """The server's VmRSS and VmHWM (MiB), open descriptors and threads, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"])}


# ---- the traffic -----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the client saw, kept per minute so growth or errors over time show."""

    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    minutes: dict[int, dict] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def minute(self) -> dict:
        index = int((time.monotonic() - self.started) // 60)
        return self.minutes.setdefault(index, {"requests": 0, "errors": 0, "latencies": [], "samples": []})

    def note(self, kind: str, latency: float | None = None, error: str | None = None,
             unexpected: str | None = None) -> None:
        with self.lock:
            window = self.minute()
            self.sent += 1
            window["requests"] += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            if latency is not None:
                window["latencies"].append(latency)
            if error:
                window["errors"] += 1
                self.errors.append(f"{kind}: {error}")
            if unexpected:
                self.unexpected.append(f"{kind}: {unexpected}")


def prompt(rng: random.Random) -> str:
    line = rng.choice(LOG_LINES).format(n=rng.randrange(10**6), m=rng.randrange(256))
    return line + " " + " ".join(rng.choice(("retry", "ok", "timeout", "worker")) for _ in range(rng.randrange(4)))


def chat_body(rng: random.Random, **extra) -> dict:
    return {"model": "tuned", "max_tokens": rng.choice((4, 8, 12)), "user": f"user-{rng.randrange(50)}",
            "messages": [{"role": "user", "content": prompt(rng)}], **extra}


def bad_request(rng: random.Random) -> tuple[str, dict]:
    """A request the server must refuse with a 4xx: (what it is, httpx request arguments)."""
    body = chat_body(rng)
    cases = [
        ("invalid_json", {"content": b'{"model": "tuned", "messages": [', "headers": {"content-type": "application/json"}}),
        ("unknown_model", {"json": {**body, "model": "no-such-arm"}}),
        ("unsupported_n", {"json": {**body, "n": 3}}),
        ("temperature", {"json": {**body, "temperature": 7}}),
        ("max_tokens", {"json": {**body, "max_tokens": 100_000}}),
        ("no_messages", {"json": {"model": "tuned"}}),
        ("shadow_name", {"json": {**body, "model": "next"}}),
        ("feedback_unknown_id", {"json": {"id": "chatcmpl-nope", "score": 1}}),
    ]
    return rng.choice(cases)


class Client:
    """One paced client: a fixed mix of request kinds, each checked for the status it must get."""

    def __init__(self, url: str, tally: Tally, seed: int = 0) -> None:
        self.http, self.tally, self.rng = httpx.Client(base_url=url, timeout=120), tally, random.Random(seed)
        self.recent_ids: list[str] = []
        self.kinds = [kind for kind, weight in MIX for _ in range(weight)]
        self.send: dict[str, Callable[[], None]] = {"chat": self.chat, "stream": self.stream,
                                                    "completion": self.completion, "feedback": self.feedback,
                                                    "bad": self.bad, "metrics": self.metrics}

    def one(self) -> None:
        kind = self.rng.choice(self.kinds)
        started = time.perf_counter()
        try:
            self.send[kind]()
        except httpx.TransportError as exc:
            self.tally.note(kind, error=f"{type(exc).__name__}: {exc}")
            return
        except Failed as failure:
            self.tally.note(kind, time.perf_counter() - started, error=failure.error, unexpected=failure.unexpected)
            return
        self.tally.note(kind, time.perf_counter() - started)

    def expect(self, response: httpx.Response, ok: bool) -> httpx.Response:
        """Raise Failed unless the status is a success (`ok`) or a 4xx (not `ok`); a 5xx is an error either way."""
        status = response.status_code
        if status >= 500:
            raise Failed(error=f"{status} {response.text[:200]}")
        if response.is_success != ok or not (ok or 400 <= status < 500):
            raise Failed(unexpected=f"{status} {response.text[:200]}")
        return response

    def chat(self) -> None:
        answer = self.expect(self.http.post("/v1/chat/completions", json=chat_body(self.rng)), True).json()
        self.recent_ids = [*self.recent_ids[-19:], answer["id"]]

    def stream(self) -> None:
        body = chat_body(self.rng, stream=True, stream_options={"include_usage": True})
        with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            self.expect(response, True)
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        if not lines or lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
            raise Failed(error=f"stream ended badly: {lines[-2:]}")

    def completion(self) -> None:
        body = {"model": "tuned", "prompt": prompt(self.rng), "max_tokens": 8}
        self.expect(self.http.post("/v1/completions", json=body), True)

    def feedback(self) -> None:
        if not self.recent_ids:
            return self.chat()
        body = {"id": self.rng.choice(self.recent_ids), "score": self.rng.choice((-1, 1, 0.5)), "comment": "soak"}
        self.expect(self.http.post("/v1/feedback", json=body), True)

    def bad(self) -> None:
        what, arguments = bad_request(self.rng)
        path = "/v1/feedback" if what.startswith("feedback") else "/v1/chat/completions"
        try:
            self.expect(self.http.post(path, **arguments), False)
        except Failed as failure:
            raise Failed(failure.error and f"{what}: {failure.error}",
                         failure.unexpected and f"{what}: {failure.unexpected}") from None

    def metrics(self) -> None:
        self.expect(self.http.get("/metrics"), True)
        self.expect(self.http.get("/health"), True)


class Failed(Exception):
    def __init__(self, error: str | None = None, unexpected: str | None = None) -> None:
        super().__init__(error or unexpected)
        self.error, self.unexpected = error, unexpected


# ---- the soak --------------------------------------------------------------------------------------------------


@dataclass
class Soak:
    """The settings of one soak and what it measured."""

    args: argparse.Namespace
    server: subprocess.Popen
    url: str
    tally: Tally = field(default_factory=Tally)
    samples: list[dict] = field(default_factory=list)
    harvests: list[dict] = field(default_factory=list)

    def sample(self) -> None:
        figures = {"t_s": round(time.monotonic() - self.tally.started, 1), **process_figures(self.server.pid)}
        self.samples.append(figures)
        with self.tally.lock:
            self.tally.minute()["samples"].append(figures)

    def harvest(self, live: Path) -> None:
        """`specialist harvest` on the live log from another process (WAL lets it read while the server writes)."""
        out = self.args.work / "queue.jsonl"
        command = [*specialist_command(), "harvest", str(self.args.work / "serve.sqlite"), "--run", str(live),
                   "--out", str(out), "--max", "20"]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        self.harvests.append({"t_s": round(time.monotonic() - self.tally.started), "rc": done.returncode,
                              "seconds": round(time.perf_counter() - started, 1),
                              "said": (done.stdout or done.stderr).strip().splitlines()[-1:]})
        if done.returncode != 0:
            self.tally.note("harvest", error=f"harvest exited {done.returncode}: {done.stderr[-300:]}")


def drive(soak: Soak, live: Path) -> None:
    """Send paced traffic until the time is up; sample the server and harvest on their schedules."""
    client, args = Client(soak.url, soak.tally), soak.args
    end = time.monotonic() + 60 * args.minutes
    next_request = next_sample = next_harvest = time.monotonic()
    next_harvest += args.harvest_every
    harvester: threading.Thread | None = None
    while (now := time.monotonic()) < end:
        if now >= next_sample:
            soak.sample()
            next_sample += args.sample_s
        if now >= next_harvest and (harvester is None or not harvester.is_alive()):
            harvester = threading.Thread(target=soak.harvest, args=(live,), daemon=True)
            harvester.start()
            next_harvest += args.harvest_every
        if now >= next_request:
            client.one()
            next_request = max(next_request + 1 / args.rate, time.monotonic() - 1)  # fall behind, never burst
        time.sleep(max(0.0, min(next_request, next_sample) - time.monotonic()))
    soak.sample()
    if harvester is not None:
        harvester.join(300)


def warm_up(url: str, seconds: float) -> None:
    """Traffic before the baseline: lazy set-up (first batch, the scrubber's regexes, SQLite pages) is not growth."""
    tally = Tally()
    client, end = Client(url, tally, seed=1), time.monotonic() + seconds
    while time.monotonic() < end:
        client.one()
        time.sleep(0.2)
    if tally.errors:
        raise SystemExit(f"errors during warm-up: {tally.errors[:5]}")


def shadow_counts(url: str) -> dict[str, int]:
    """The shadow's outcomes from /metrics (answered, queue_full, preempted, ...), summed over shadow arms."""
    counts: dict[str, int] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("specialist_shadow_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = counts.get(outcome, 0) + int(float(line.rsplit(" ", 1)[1]))
    return counts


def log_report(work: Path) -> dict:
    """`specialist ab-report --json` on the log once the server is gone: the log is whole after SIGTERM, and what
    the shadow logged."""
    out = work / "ab.json"
    done = subprocess.run([*specialist_command(), "ab-report", str(work / "serve.sqlite"), "--json", str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if done.returncode != 0:
        return {"error": done.stderr[-300:]}
    report = json.loads(out.read_text())
    shadows = {name: {"requests": s["requests"], "agreement": s["agreement"]} for name, s in report["shadows"].items()}
    return {"requests_kept": report["requests"], "shadows": shadows}


def stop(server: subprocess.Popen) -> int:
    """SIGTERM, as a supervisor stops it: uvicorn drains, then re-raises the signal, so a clean stop is -15."""
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        return -9


# ---- the figures -----------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def summary(soak: Soak, exit_code: int) -> dict:
    rss = [s["rss_mib"] for s in soak.samples]
    start, end, highest = rss[0], rss[-1], max(rss)
    minutes = []
    for index, window in sorted(soak.tally.minutes.items()):
        if not window["requests"]:  # the last sample, taken as the time ran out, opens an empty minute
            continue
        last = window["samples"][-1] if window["samples"] else {}
        minutes.append({"minute": index + 1, "requests": window["requests"], "errors": window["errors"],
                        "p50_s": percentile(window["latencies"], 0.5), "p99_s": percentile(window["latencies"], 0.99),
                        "rss_mib": last.get("rss_mib"), "fds": last.get("fds"), "threads": last.get("threads")})
    return {"requests": soak.tally.sent, "by_kind": soak.tally.by_kind, "errors": soak.tally.errors,
            "unexpected": soak.tally.unexpected, "rss_start_mib": start, "rss_max_mib": highest, "rss_end_mib": end,
            "growth_end_pct": 100 * (end - start) / start, "growth_max_pct": 100 * (highest - start) / start,
            "fds_start": soak.samples[0]["fds"], "fds_end": soak.samples[-1]["fds"],
            "threads_start": soak.samples[0]["threads"], "threads_end": soak.samples[-1]["threads"],
            "harvests": soak.harvests, "server_exit_code": exit_code, "minutes": minutes, "samples": soak.samples}


def print_figures(figures: dict, args: argparse.Namespace, cpu_line: str) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1000 * value:.0f}"

    print(f"\nsoak: {args.minutes:g} min at {args.rate:g} requests/s after {args.warmup_s:g} s of warm-up; "
          f"serve --shadow (share 0.5) --log-prompts --scrub-logs --log-max-rows 1000; {args.source}")
    print(f"{'minute':>6}{'requests':>10}{'errors':>8}{'p50 ms':>8}{'p99 ms':>8}{'RSS MiB':>9}{'fds':>5}{'threads':>8}")
    for m in figures["minutes"]:
        rss = "-" if m["rss_mib"] is None else f"{m['rss_mib']:.1f}"
        print(f"{m['minute']:>6}{m['requests']:>10}{m['errors']:>8}{ms(m['p50_s']):>8}{ms(m['p99_s']):>8}"
              f"{rss:>9}{m['fds'] or '-':>5}{m['threads'] or '-':>8}")
    print(f"requests sent {figures['requests']} ({', '.join(f'{k} {n}' for k, n in sorted(figures['by_kind'].items()))})")
    print(f"errors (5xx, connection, broken stream, failed harvest): {len(figures['errors'])}; "
          f"unexpected statuses: {len(figures['unexpected'])}")
    for line in (figures["errors"] + figures["unexpected"])[:10]:
        print(f"  {line}")
    harvests = figures["harvests"]
    print(f"harvests {len(harvests)}, failed {sum(h['rc'] != 0 for h in harvests)}"
          + (f"; last: {harvests[-1]['said']}" if harvests else ""))
    print(f"server RSS MiB: start (after warm-up) {figures['rss_start_mib']:.1f}, max {figures['rss_max_mib']:.1f}, "
          f"end {figures['rss_end_mib']:.1f}; growth {figures['growth_end_pct']:+.2f}% at the end, "
          f"{figures['growth_max_pct']:+.2f}% at the highest")
    print(f"open descriptors {figures['fds_start']} -> {figures['fds_end']}, threads {figures['threads_start']} -> "
          f"{figures['threads_end']}; server exit code on SIGTERM {figures['server_exit_code']} (-15: drained, "
          f"then uvicorn re-raised the signal)")
    print(f"shadow outcomes {figures['shadow_outcomes']}; the log after the stop (ab-report): {figures['log']}")
    print(f"{cpu_line}; server OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpuinfo import cpu_description, flags_line

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?", help="a run folder (default: the tests' tiny run)")
    parser.add_argument("--shadow", type=Path, help="the shadow run (default: RUN with its adapter scrambled)")
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--rate", type=float, default=3, help="requests a second")
    parser.add_argument("--warmup-s", type=float, default=60)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--harvest-every", type=float, default=180, help="seconds between harvests")
    parser.add_argument("--work", type=Path, default=Path("/tmp/specialist-soak"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    live, shadow = (args.source, args.shadow) if args.source else tiny_runs(args.work)
    if shadow is None:
        shadow = args.work / "runs" / "shadow"
        scrambled_copy(live, shadow)
    args.source = live
    port = free_port()
    server = start_server(live, shadow, args.work, port)
    try:
        url = f"http://127.0.0.1:{port}"
        warm_up(url, args.warmup_s)
        soak = Soak(args, server, url)
        drive(soak, live)
        shadow = shadow_counts(url)
    finally:
        exit_code = stop(server)
    figures = {**summary(soak, exit_code), "shadow_outcomes": shadow, "log": log_report(args.work)}
    cpu = cpu_description()
    print_figures(figures, args, flags_line(cpu))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu,
                                    **figures}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
