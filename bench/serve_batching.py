"""Serving throughput: on-the-fly batching against one request at a time, same server, same requests.

    .venv/bin/python bench/serve_batching.py RUN_OR_EXPORT_DIR [--clients 32] [--requests 128] [--max-tokens 16]

Starts `specialist serve`'s app twice on loopback (max_batch 8, then max_batch 1), each time firing the same
requests (held-out prompts of the run's data, chat endpoint, greedy) from `--clients` concurrent clients, and
prints requests/s and latency p50/p95 for both, with the ratio. Figures go to bench/results/serve_batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prompts_of(source: Path, n: int) -> list[str]:
    run = source
    if (source / "export.json").is_file():
        run = Path(json.loads((source / "export.json").read_text())["run"])
    rows = [json.loads(line) for line in (run / "data" / "test.jsonl").read_text().splitlines()]
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


async def fire(url: str, prompts: list[str], clients: int, max_tokens: int) -> list[float]:
    import httpx

    semaphore = asyncio.Semaphore(clients)
    latencies: list[float] = []

    async def one(session, prompt):
        async with semaphore:
            start = time.perf_counter()
            response = await session.post("/v1/chat/completions", timeout=600, json={
                "model": "arm", "max_tokens": max_tokens, "messages": [{"role": "user", "content": prompt}]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=clients)) as session:
        await asyncio.gather(*(one(session, p) for p in prompts))
    return latencies


def measure(arm, prompts: list[str], clients: int, max_tokens: int, max_batch: int) -> dict:
    from specialist.deploy.serve import BackgroundServer, ServeSettings, create_app

    with tempfile.TemporaryDirectory() as scratch:
        settings = ServeSettings(split={"arm": 1.0}, db=Path(scratch) / "log.sqlite", max_batch=max_batch,
                                 max_wait_ms=20, queue_size=len(prompts) + 1)
        app = create_app({"arm": arm}, settings)
        with BackgroundServer(app) as server:
            asyncio.run(fire(server.url, prompts[:2], 2, max_tokens))  # warm-up
            start = time.perf_counter()
            latencies = asyncio.run(fire(server.url, prompts, clients, max_tokens))
            seconds = time.perf_counter() - start
        worker = app.state.workers["arm"]
    ordered = sorted(latencies)
    return {"max_batch": max_batch, "requests": len(prompts), "seconds": seconds,
            "requests_per_s": len(prompts) / seconds, "latency_p50_s": statistics.median(ordered),
            "latency_p95_s": ordered[int(0.95 * (len(ordered) - 1))],
            "mean_batch": worker.batched_requests / max(1, worker.batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a run folder or an export folder")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve_batching.json")
    args = parser.parse_args()

    from specialist.deploy.arms import load_arm

    arm = load_arm("arm", str(args.source))
    prompts = prompts_of(args.source, args.requests)
    results = {name: measure(arm, prompts, args.clients, args.max_tokens, batch)
               for name, batch in (("batched (8)", 8), ("one at a time", 1))}
    a, b = results["one at a time"], results["batched (8)"]
    print(f"\n{args.requests} requests, {args.clients} concurrent clients, max_tokens {args.max_tokens}, {args.source}")
    print(f"{'':20}{'requests/s':>12}{'p50 s':>10}{'p95 s':>10}{'mean batch':>12}")
    for name, r in results.items():
        print(f"{name:20}{r['requests_per_s']:>12.2f}{r['latency_p50_s']:>10.2f}{r['latency_p95_s']:>10.2f}"
              f"{r['mean_batch']:>12.1f}")
    ratio = b["requests_per_s"] / a["requests_per_s"]
    print(f"batched / one at a time: {ratio:.2f}x requests/s, p95 {b['latency_p95_s'] / a['latency_p95_s']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                    "requests_per_s_ratio": ratio}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
