#!/usr/bin/env python3
"""Load generator for a remask gRPC server (service remask.v1.Generation).

Runs C client threads, each with its own channel and stub, that together send N
requests (Generate, or GenerateStream with --stream), then prints throughput and
latency:

    target/release/remask serve --model DIR --host 127.0.0.1 --no-http &
    python3 bench/grpc_load.py --endpoint 127.0.0.1:50051 --concurrency 8 --requests 64 \\
        --prompt-len 32 --gen-length 64 --steps 64 --block-length 32 [--stream] [--json]

Reported: tokens/s (generated tokens of the successful requests over the wall
time of the timed phase), requests/s, p50/p90 latency of a request as the client
sees it, the server's mean elapsed_ms and queue_ms, and with --stream the mean
time per step seen by the client (from sending the request to the last step
message, over the number of steps) and the median time to the first step.

Prompts: request i gets --prompt-len token ids that depend only on i (and
--seed), distinct between requests, drawn from the model's vocabulary without
the mask token (the vocabulary comes from ModelInfo).

The Python stubs are generated from proto/remask/v1/generation.proto into a
temporary directory at start (requires grpcio and grpcio-tools; see
tests/grpc/requirements.txt). The run is bounded: --requests (at most 100000),
--concurrency (at most 1024), a deadline per request (--timeout) and a limit on
the whole timed phase (--max-seconds) after which no new request is sent.
Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 1024


def load_stubs(proto_root: Path):
    proto = proto_root / "remask" / "v1" / "generation.proto"
    out = tempfile.mkdtemp(prefix="remask-grpc-stubs-")
    res = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(proto_root),
         f"--python_out={out}", f"--grpc_python_out={out}", str(proto)],
        capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"grpc_load: protoc failed on {proto}: {res.stderr.strip()}")
    sys.path.insert(0, out)
    pb = importlib.import_module("remask.v1.generation_pb2")
    pb_grpc = importlib.import_module("remask.v1.generation_pb2_grpc")
    return pb, pb_grpc


def prompt_ids(index: int, length: int, vocab: int, mask: int, seed: int) -> list[int]:
    """Deterministic per request index; distinct between indices (the leading
    ids spell the index in base `vocab - 1`, the rest are pseudo-random)."""
    base = vocab - 1  # every id but the mask token

    def tok(x: int) -> int:
        return x if x < mask else x + 1

    rng = random.Random(seed * 1_000_003 + index)
    ids = [tok(rng.randrange(base)) for _ in range(length)]
    n, pos = index, 0
    while pos < length:
        ids[pos] = tok(n % base)
        n //= base
        pos += 1
        if n == 0:
            break
    return ids


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default="127.0.0.1:50051", help="host:port (default 127.0.0.1:50051)")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads, one channel each")
    ap.add_argument("--requests", type=int, default=32, help="timed requests in total")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stream", action="store_true", help="use GenerateStream")
    ap.add_argument("--warmup", type=int, default=1, help="untimed requests before the timed phase")
    ap.add_argument("--timeout", type=float, default=300.0, help="deadline of one request, seconds")
    ap.add_argument("--max-seconds", type=float, default=600.0,
                    help="no new request after this many seconds of the timed phase")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts (and of sampling)")
    ap.add_argument("--proto-root", type=Path, default=REPO / "proto")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        ap.error(f"--concurrency must be in 1..{MAX_CONCURRENCY}")
    if not 1 <= args.requests <= MAX_REQUESTS:
        ap.error(f"--requests must be in 1..{MAX_REQUESTS}")
    if args.prompt_len < 1 or args.gen_length < 1 or args.steps < 1 or args.block_length < 1:
        ap.error("--prompt-len, --gen-length, --steps and --block-length must be >= 1")
    if not 0 <= args.warmup <= 1000:
        ap.error("--warmup must be in 0..1000")

    import grpc

    pb, pb_grpc = load_stubs(args.proto_root)

    with grpc.insecure_channel(args.endpoint) as ch:
        try:
            grpc.channel_ready_future(ch).result(timeout=30)
            info = pb_grpc.GenerationStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=30)
        except (grpc.FutureTimeoutError, grpc.RpcError) as e:
            sys.exit(f"grpc_load: cannot reach {args.endpoint}: {e}")
    if args.prompt_len + args.gen_length > info.max_sequence_length:
        ap.error(f"prompt-len + gen-length exceeds the model's max_sequence_length {info.max_sequence_length}")

    def request(index: int):
        return pb.GenerateRequest(
            prompt_ids=prompt_ids(index, args.prompt_len, info.vocab_size, info.mask_token_id, args.seed),
            gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
            temperature=args.temperature, seed=args.seed + index)

    def one(stub, index: int) -> dict:
        """Runs one request; returns its measurements."""
        req = request(index)
        t0 = time.perf_counter()
        if not args.stream:
            resp = stub.Generate(req, timeout=args.timeout)
            t1 = time.perf_counter()
            return dict(latency_s=t1 - t0, tokens=len(resp.generated_ids),
                        elapsed_ms=resp.elapsed_ms, queue_ms=resp.queue_ms)
        n_steps, first_step, last_step, done = 0, None, None, None
        for msg in stub.GenerateStream(req, timeout=args.timeout):
            now = time.perf_counter()
            if msg.WhichOneof("event") == "step":
                n_steps += 1
                first_step = now if first_step is None else first_step
                last_step = now
            else:
                done = msg.done
        t1 = time.perf_counter()
        if done is None:
            raise RuntimeError("stream ended without a done message")
        return dict(latency_s=t1 - t0, tokens=len(done.generated_ids),
                    elapsed_ms=done.elapsed_ms, queue_ms=done.queue_ms, steps=n_steps,
                    step_s=(last_step - t0) / n_steps if n_steps else math.nan,
                    first_step_s=(first_step - t0) if first_step is not None else math.nan)

    # warmup: untimed, on one channel, with indices after the timed ones
    if args.warmup:
        with grpc.insecure_channel(args.endpoint) as ch:
            stub = pb_grpc.GenerationStub(ch)
            for w in range(args.warmup):
                try:
                    one(stub, args.requests + w)
                except grpc.RpcError as e:
                    sys.exit(f"grpc_load: warmup request failed: {e.code().name}: {e.details()}")

    lock = threading.Lock()
    next_index = [0]
    results: list[dict] = []
    errors: list[str] = []
    stop_at = [math.inf]

    def worker():
        with grpc.insecure_channel(args.endpoint) as ch:
            stub = pb_grpc.GenerationStub(ch)
            while True:
                with lock:
                    if next_index[0] >= args.requests or time.perf_counter() >= stop_at[0]:
                        return
                    index = next_index[0]
                    next_index[0] += 1
                try:
                    r = one(stub, index)
                    with lock:
                        results.append(r)
                except Exception as e:  # noqa: BLE001 - reported and counted
                    msg = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else repr(e)
                    with lock:
                        errors.append(msg)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    t_start = time.perf_counter()
    stop_at[0] = t_start + args.max_seconds
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start

    lat_ms = [r["latency_s"] * 1e3 for r in results]
    tokens = sum(r["tokens"] for r in results)
    out = dict(
        endpoint=args.endpoint, rpc="GenerateStream" if args.stream else "Generate",
        concurrency=args.concurrency, requests=args.requests, completed=len(results),
        failed=len(errors), not_sent=args.requests - len(results) - len(errors),
        prompt_len=args.prompt_len, gen_length=args.gen_length, steps=args.steps,
        block_length=args.block_length, temperature=args.temperature,
        model=info.model, stages=info.stages,
        wall_s=wall, generated_tokens=tokens,
        tokens_per_s=tokens / wall if wall > 0 else math.nan,
        requests_per_s=len(results) / wall if wall > 0 else math.nan,
        latency_ms_p50=percentile(lat_ms, 0.5), latency_ms_p90=percentile(lat_ms, 0.9),
        latency_ms_mean=mean(lat_ms),
        server_elapsed_ms_mean=mean([r["elapsed_ms"] for r in results]),
        server_queue_ms_mean=mean([r["queue_ms"] for r in results]),
    )
    if args.stream:
        out["step_ms_mean"] = mean([r["step_s"] * 1e3 for r in results if not math.isnan(r["step_s"])])
        out["first_step_ms_p50"] = percentile(
            [r["first_step_s"] * 1e3 for r in results if not math.isnan(r["first_step_s"])], 0.5)
        out["steps_seen_mean"] = mean([r["steps"] for r in results])
    if errors:
        out["errors"] = sorted(set(errors))[:10]

    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}))
    else:
        print(f"{out['rpc']} x{out['completed']}/{args.requests} on {args.endpoint}, concurrency {args.concurrency}, "
              f"prompt {args.prompt_len} + gen {args.gen_length}, {args.steps} steps, block {args.block_length}")
        print(f"  wall {wall:.3f} s   {out['tokens_per_s']:.1f} tokens/s   {out['requests_per_s']:.2f} requests/s")
        print(f"  latency p50 {out['latency_ms_p50']:.1f} ms   p90 {out['latency_ms_p90']:.1f} ms   "
              f"(server: elapsed {out['server_elapsed_ms_mean']:.1f} ms, queue {out['server_queue_ms_mean']:.1f} ms mean)")
        if args.stream:
            print(f"  client: {out['step_ms_mean']:.2f} ms per step (mean), "
                  f"first step after {out['first_step_ms_p50']:.1f} ms (p50)")
        if errors:
            print(f"  {len(errors)} failed: {'; '.join(out['errors'])}")
        if out["not_sent"]:
            print(f"  {out['not_sent']} not sent (--max-seconds {args.max_seconds} reached)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
