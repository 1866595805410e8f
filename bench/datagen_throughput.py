"""Data-generation throughput against the scripted server: brandcopy.llm versus the seed's loop.

The server answers every request after a fixed latency (300 ms by default). ``run_requests`` with
concurrency 16 should reach at least 80% of the ideal ``concurrency / latency`` (about 53 req/s).
The seed's way, two threads that each sleep 0.5 s after every call, is measured in the same run
(on fewer requests: its rate is steady and it is slow).

Usage: python bench/datagen_throughput.py [--requests 200] [--latency 0.3] [--concurrency 16]
The last line printed is one JSON object: req_per_s, ideal_req_per_s, seed_way_req_per_s, ...
"""

import argparse
import json
import tempfile
import threading
import time

import openai

from brandcopy.llm import LLMClient, LLMConfig, Request, run_requests
from brandcopy.mockserver import ScriptedServer


def ours(url: str, n: int, concurrency: int, out_dir: str) -> float:
    """Returns req/s of run_requests (cache off, results fsynced as in real use)."""
    config = LLMConfig(model="mock", base_url=url, api_key_env=None, concurrency=concurrency, cache_dir=None)
    requests = [Request(f"k{i}", [{"role": "user", "content": f"请写第{i}条文案"}]) for i in range(n)]
    start = time.perf_counter()
    summary = run_requests(LLMClient(config), requests, f"{out_dir}/out.jsonl", f"{out_dir}/failures.jsonl")
    elapsed = time.perf_counter() - start
    assert summary.produced == n, summary
    return n / elapsed


def seed_way(url: str, n: int) -> float:
    """Returns req/s of the seed's loop: 2 threads, a blocking call, then sleep(0.5)."""
    client = openai.OpenAI(base_url=url, api_key="unused")
    todo = list(range(n))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            client.chat.completions.create(model="mock", messages=[{"role": "user", "content": f"请写第{i}条文案"}])
            time.sleep(0.5)

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed-requests", type=int, default=40)
    args = parser.parse_args()
    with ScriptedServer(latency=args.latency) as server, tempfile.TemporaryDirectory() as out_dir:
        rate = ours(server.url, args.requests, args.concurrency, out_dir)
        seed_rate = seed_way(server.url, args.seed_requests)
    ideal = args.concurrency / args.latency
    result = {
        "req_per_s": round(rate, 2),
        "ideal_req_per_s": round(ideal, 2),
        "fraction_of_ideal": round(rate / ideal, 3),
        "seed_way_req_per_s": round(seed_rate, 2),
        "speedup_vs_seed": round(rate / seed_rate, 1),
        "requests": args.requests,
        "seed_way_requests": args.seed_requests,
        "latency_s": args.latency,
        "concurrency": args.concurrency,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
