#!/usr/bin/env python3
"""Admin API under load (issue 11): hot add to first prediction, and failures of other tasks meanwhile.

Starts the release server with API and admin keys, keeps wrk at `--concurrency` connections predicting the other
tasks' golden images for the whole run, and meanwhile, `--rounds` times: PUT a new expert (a package expert's file
re-tagged with a fresh task id), time until its first 200 prediction, PUT a replacement, DELETE it. Reports the
p50/p90 of "PUT sent -> first 200 prediction", the admin calls' latencies, and wrk's non-2xx/errors for the other
tasks (the target is zero). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def retag(file: bytes, task: str) -> bytes:
    """The same trained factors with the file's own task id set to `task` (the server checks it)."""
    length = int.from_bytes(file[:8], "little")
    header = json.loads(file[8 : 8 + length])
    header["__metadata__"]["task"] = task
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + file[8 + length :]


def multipart(spec: dict, expert: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\nContent-Type: application/json\r\n\r\n"
        f"{json.dumps(spec)}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"expert\"; "
        f"filename=\"e.safetensors\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode() + expert + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=str(ROOT / "target/release/lorkd"))
    ap.add_argument("--package", default=str(ROOT / "models/medmnist-lorkd"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    package = Path(args.package)
    manifest = json.loads((package / "manifest.json").read_text())
    golden = json.loads((package / "golden/golden.json").read_text())
    tasks = {t["id"]: t for t in manifest["tasks"]}
    source, replacement, *others = list(tasks)
    if tasks[source]["num_classes"] != tasks[replacement]["num_classes"]:
        others, replacement = [replacement, *others], source
    load_tasks = [t for t in tasks if t != source] or [source]
    api_key, admin_key = uuid.uuid4().hex, uuid.uuid4().hex
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ORT_DYLIB_PATH": os.environ.get("ORT_DYLIB_PATH", str(ROOT / ".ort/lib/libonnxruntime.so.1.31.1"))}
    server = subprocess.Popen(
        [args.binary, "--package", str(package), "--host", "127.0.0.1", "--port", str(port), "--preload", "all",
         "--api-keys", api_key, "--admin-keys", admin_key, "--log", "warn"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = {"Authorization": f"Bearer {api_key}"}
    admin = {"Authorization": f"Bearer {admin_key}"}
    try:
        for _ in range(600):
            try:
                if call("GET", f"{base}/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        with tempfile.TemporaryDirectory() as tmp:
            tasks_file = Path(tmp) / "tasks"
            tasks_file.write_text("\n".join(load_tasks) + "\n")
            png = next(c for c in golden["cases"] if c["task"] in load_tasks)["file"]
            wrk_env = {**os.environ, "BODY_FILE": str(package / png), "CONTENT_TYPE": "image/png",
                       "PATH_FMT": "/v1/experts/%s/predict", "TASKS_FILE": str(tasks_file),
                       "AUTHORIZATION": f"Bearer {api_key}", "WRK_RESULT": str(Path(tmp) / "wrk.json")}
            duration = max(10, args.rounds * 2)
            wrk = subprocess.Popen(["wrk", "-t1", f"-c{args.concurrency}", f"-d{duration}s", "-s",
                                    str(ROOT / "scripts/bench/post.lua"), base], env=wrk_env,
                                   stdout=subprocess.DEVNULL)
            time.sleep(1.0)
            spec = {k: tasks[source][k] for k in ("name", "modality", "labels", "num_classes", "input")}
            spec_replacement = {k: tasks[replacement][k] for k in ("name", "modality", "labels", "num_classes", "input")}
            file_source = (package / tasks[source]["file"]).read_bytes()
            file_replacement = (package / tasks[replacement]["file"]).read_bytes()
            test_png = (package / next(c for c in golden["cases"] if c["task"] == source)["file"]).read_bytes()
            first_answer, put_ms, replace_ms, delete_ms, admin_failures = [], [], [], [], 0
            for round_ in range(args.rounds):
                task = f"hot{round_}"
                body, ctype = multipart(spec, retag(file_source, task))
                started = time.perf_counter()
                status, _ = call("PUT", f"{base}/v1/experts/{task}", body, {**admin, "Content-Type": ctype})
                put_ms.append(1e3 * (time.perf_counter() - started))
                admin_failures += status != 201
                while True:
                    status, _ = call("POST", f"{base}/v1/experts/{task}/predict", test_png,
                                     {**auth, "Content-Type": "image/png"})
                    if status == 200:
                        break
                    if time.perf_counter() - started > 10:
                        admin_failures += 1
                        break
                first_answer.append(1e3 * (time.perf_counter() - started))
                body, ctype = multipart(spec_replacement, retag(file_replacement, task))
                t0 = time.perf_counter()
                status, _ = call("PUT", f"{base}/v1/experts/{task}", body, {**admin, "Content-Type": ctype})
                replace_ms.append(1e3 * (time.perf_counter() - t0))
                admin_failures += status != 200
                t0 = time.perf_counter()
                status, _ = call("DELETE", f"{base}/v1/experts/{task}", None, admin)
                delete_ms.append(1e3 * (time.perf_counter() - t0))
                admin_failures += status != 200
            wrk.wait()
            load = json.loads((Path(tmp) / "wrk.json").read_text())
    finally:
        server.terminate()
        server.wait()

    def summary(values: list[float]) -> dict:
        ordered = sorted(values)
        return {"p50_ms": round(statistics.median(ordered), 2), "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
                "max_ms": round(ordered[-1], 2)}

    report = {
        "rounds": args.rounds, "concurrency": args.concurrency, "load_tasks": load_tasks,
        "hot_add_to_first_prediction": summary(first_answer), "put_add": summary(put_ms),
        "put_replace": summary(replace_ms), "delete": summary(delete_ms), "admin_failures": admin_failures,
        "load": {"requests": load["requests"], "seconds": load["duration_us"] / 1e6,
                 "non_2xx": load["errors"]["status"],
                 "socket_errors": sum(v for k, v in load["errors"].items() if k != "status"),
                 "p50_ms": load["latency_us"]["p50"] / 1e3, "p99_ms": load["latency_us"]["p99"] / 1e3},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    failed = report["load"]["non_2xx"] + report["load"]["socket_errors"] + admin_failures
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
