#!/usr/bin/env python3
"""Soak test (issue 9, not in CI): mixed good, bad and slow traffic against a running lorkd for a fixed time.

Each of `--concurrency` workers loops over a weighted mix:
  good      native predict of a golden PNG (task rotates)                       must be 200
  oip       OIP v2 infer of a golden image                                      must be 200
  bad       garbage image, wrong content type, unknown task, too many images    must be 4xx
  slow      headers + part of the body, a pause of 0-3 s, then the rest         200 or 408
  stall     headers + 4 bytes, then hang up or wait for the server's 408         never answered 5xx
It samples the server's RSS every `--sample` seconds and writes a JSON report: counts by kind and status,
p50/p99 latency of the good requests, RSS over time and its drift (last minute vs the first minute after
warm-up). Exit status 1 on any 5xx or a good request that was not 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def request(host: str, port: int, method: str, path: str, headers: dict[str, str], body: bytes,
                  pause_after: int | None = None, pause_s: float = 0.0, abandon: bool = False) -> tuple[int, float]:
    """One HTTP/1.1 request on a fresh connection; returns (status, seconds). Status 0: no answer."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode())
        if pause_after is None:
            writer.write(body)
        else:
            writer.write(body[:pause_after])
            await writer.drain()
            if abandon:
                await asyncio.sleep(pause_s)
                return 0, time.perf_counter() - started
            await asyncio.sleep(pause_s)
            writer.write(body[pause_after:])
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=60)
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return status, time.perf_counter() - started
    except (TimeoutError, ConnectionError):
        return 0, time.perf_counter() - started
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


def oip_body(png: bytes, task: dict, n: int = 1) -> bytes:
    # Zeros of the right shape: the OIP path parses and runs them like any tensor.
    h, w = task["input"]["height"], task["input"]["width"]
    data = ",".join(["0"] * (n * 3 * h * w))
    return (f'{{"inputs":[{{"name":"input","shape":[{n},3,{h},{w}],"datatype":"FP32","data":[{data}]}}]}}').encode()


async def worker(args, cases, tasks, stop_at: float, stats: dict) -> None:
    rng = random.Random()
    headers_key = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    kinds = ["good"] * 60 + ["oip"] * 10 + ["bad"] * 15 + ["slow"] * 10 + ["stall"] * 5
    while time.perf_counter() < stop_at:
        kind = rng.choice(kinds)
        case = rng.choice(cases)
        task = tasks[case["task"]]
        png = case["png"]
        path = f"/v1/experts/{case['task']}/predict"
        h = {"Content-Type": "image/png", **headers_key}
        if kind == "good":
            status, took = await request(args.host, args.port, "POST", path, h, png)
            stats["good_latency"].append(took)
        elif kind == "oip":
            status, took = await request(args.host, args.port, "POST", f"/v2/models/{case['task']}/infer",
                                         {"Content-Type": "application/json", **headers_key}, oip_body(png, task))
        elif kind == "bad":
            variant = rng.randrange(4)
            if variant == 0:
                status, took = await request(args.host, args.port, "POST", path, h, bytes(rng.randbytes(2000)))
            elif variant == 1:
                status, took = await request(args.host, args.port, "POST", path,
                                             {"Content-Type": "text/plain", **headers_key}, b"hello")
            elif variant == 2:
                status, took = await request(args.host, args.port, "POST", "/v1/experts/nope/predict", h, png)
            else:
                status, took = await request(args.host, args.port, "POST", f"/v2/models/{case['task']}/infer",
                                             {"Content-Type": "application/json", **headers_key},
                                             oip_body(png, task, n=args.max_images + 1))
        elif kind == "slow":
            body = png + bytes(20_000)  # trailing bytes after IEND are ignored by the decoder
            status, took = await request(args.host, args.port, "POST", path, h, body,
                                         pause_after=rng.randrange(1, len(body)), pause_s=rng.uniform(0, 3))
        else:
            status, took = await request(args.host, args.port, "POST", path, h, png + bytes(100_000),
                                         pause_after=4, pause_s=rng.uniform(0, 2), abandon=rng.random() < 0.5)
        stats["counts"][f"{kind} {status}"] += 1


async def sampler(pid: int, every: float, stop_at: float, samples: list) -> None:
    started = time.perf_counter()
    while time.perf_counter() < stop_at:
        samples.append((round(time.perf_counter() - started, 1), rss_bytes(pid)))
        await asyncio.sleep(every)
    samples.append((round(time.perf_counter() - started, 1), rss_bytes(pid)))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="server process id (for RSS)")
    ap.add_argument("--package", default="models/medmnist-lorkd")
    ap.add_argument("--key", default="")
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sample", type=float, default=5)
    ap.add_argument("--max-images", type=int, default=32, help="the server's LORKD_MAX_CLIENT_BATCH_SIZE")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    package = Path(args.package)
    golden = json.loads((package / "golden/golden.json").read_text())
    manifest = json.loads((package / "manifest.json").read_text())
    tasks = {t["id"]: t for t in manifest["tasks"]}
    cases = [{**c, "png": (package / c["file"]).read_bytes()} for c in golden["cases"]]
    stats = {"counts": Counter(), "good_latency": []}
    samples: list = []
    stop_at = time.perf_counter() + args.seconds
    await asyncio.gather(sampler(args.pid, args.sample, stop_at, samples),
                         *(worker(args, cases, tasks, stop_at, stats) for _ in range(args.concurrency)))
    lat = sorted(stats["good_latency"])
    first_minute = [r for t, r in samples if 30 <= t <= 90] or [samples[0][1]]
    last_minute = [r for t, r in samples if t >= samples[-1][0] - 60]
    report = {
        "seconds": args.seconds, "concurrency": args.concurrency,
        "counts": dict(sorted(stats["counts"].items())),
        "good_p50_ms": round(1e3 * statistics.median(lat), 2) if lat else None,
        "good_p99_ms": round(1e3 * lat[int(0.99 * (len(lat) - 1))], 2) if lat else None,
        "rss_mib": {"start": samples[0][1] / 2**20, "max": max(r for _, r in samples) / 2**20,
                    "end": samples[-1][1] / 2**20,
                    "first_minute_median": statistics.median(first_minute) / 2**20,
                    "last_minute_median": statistics.median(last_minute) / 2**20},
        "rss_samples": samples,
    }
    report["rss_drift_percent"] = round(
        100 * (report["rss_mib"]["last_minute_median"] / report["rss_mib"]["first_minute_median"] - 1), 2)
    args.out.write_text(json.dumps(report, indent=1))
    server_errors = sum(n for k, n in stats["counts"].items() if k.split()[1].startswith("5"))
    bad_good = sum(n for k, n in stats["counts"].items() if k.split()[0] in ("good", "oip") and k.split()[1] != "200")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=1))
    print(f"soak: {server_errors} 5xx, {bad_good} good requests not answered 200")
    return 1 if server_errors or bad_good else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
