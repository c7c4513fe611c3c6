"""End-to-end test of a built lorkd image (run by scripts/test-deploy.sh; Python stdlib only).

Starts the image as Kubernetes would run it (non-root, read-only root filesystem, tmpfs /tmp, no
capabilities, the ConfigMap's settings with --env-file), measures cold start to ready, checks the container HEALTHCHECK, predicts every golden
image of the baked-in package through `POST /v1/experts/{task}/predict` (top-1 and logits against
golden/golden.json), checks /v1/info and /metrics, then sends SIGTERM while a request is still in
flight and checks that the request is answered (drain), the log says so and the exit code is 0.
A second run mounts a different package (a subset of the default one) read-only and points
LORKD_PACKAGE at it, to prove a package is replaceable without rebuilding.

    python docker/e2e.py --image lorkd:local --package models/medmnist-lorkd
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUN_FLAGS = [
    "--read-only",
    "--tmpfs",
    "/tmp:rw,size=64m",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--memory",
    "1g",
    # The image's HEALTHCHECK command, run every second here so the test sees it turn healthy quickly.
    "--health-interval",
    "1s",
    "--health-start-period",
    "60s",
    "-p",
    "127.0.0.1::8080",
    "-p",
    "127.0.0.1::9090",
]
# Sent with every request when the container runs with API keys (the Kubernetes settings do).
AUTH: dict[str, str] = {}
DRAIN_LOG = "shutdown requested"
DRAIN_TIMEOUT_LOG = "drain timeout passed"


class E2EError(Exception):
    pass


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=False)
    if check and out.returncode != 0:
        raise E2EError(f"docker {' '.join(args[:3])} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30):
    request = urllib.request.Request(url, data=body, method=method, headers={**AUTH, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


class Container:
    def __init__(self, image: str, name: str, extra: list[str]):
        self.name = name
        docker("rm", "-f", name, check=False)
        self.started = time.monotonic()
        self.id = docker("run", "-d", "--name", name, *RUN_FLAGS, *extra, image)
        port = docker("port", name, "8080/tcp").splitlines()[0].rsplit(":", 1)[1]
        self.base = f"http://127.0.0.1:{port}"
        ops = docker("port", name, "9090/tcp").splitlines()[0].rsplit(":", 1)[1]
        # The ops routes (/metrics, /v1/info) move to port 9090 when LORKD_OPS_PORT=9090, else stay on 8080.
        self.ops_base = f"http://127.0.0.1:{ops}" if "LORKD_OPS_PORT=9090" in " ".join(extra) else self.base

    def state(self) -> dict[str, Any]:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name))

    def logs(self) -> str:
        out = subprocess.run(["docker", "logs", self.name], capture_output=True, text=True, check=False)
        return out.stdout + out.stderr

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from `docker run` to the first 200 on /v2/health/ready."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = http("GET", f"{self.base}/v2/health/ready", timeout=2)
                if status == 200:
                    return time.monotonic() - self.started
            except (OSError, urllib.error.URLError):
                pass
            if not self.state()["Running"]:
                raise E2EError(f"container exited before ready:\n{self.logs()[-3000:]}")
            time.sleep(0.05)
        raise E2EError(f"not ready after {timeout:.0f}s:\n{self.logs()[-3000:]}")

    def exec_to_ready(self) -> float | None:
        """Seconds from the container's start to lorkd's JSON log line that says it is ready (best effort)."""
        started = parse_time(self.state()["StartedAt"])
        for line in self.logs().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "ready" in str(event.get("message", "")) and "timestamp" in event:
                return parse_time(event["timestamp"]) - started
        return None

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.state().get("Health") or {}
            if health.get("Status") == "healthy":
                return
            time.sleep(0.25)
        raise E2EError(f"HEALTHCHECK never reported healthy: {json.dumps(self.state().get('Health'))[:1500]}")

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


def parse_time(text: str) -> float:
    """RFC 3339 with up to nanoseconds (Docker, tracing) -> POSIX seconds."""
    stamp, _, frac = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp() + float(f"0.{frac or 0}")


def predict(base: str, task: str, png: bytes) -> dict[str, Any]:
    status, body = http("POST", f"{base}/v1/experts/{task}/predict", png, {"Content-Type": "image/png"})
    if status != 200:
        raise E2EError(f"predict {task}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)


def check_case(response: dict[str, Any], case: dict[str, Any], tolerance: float) -> float:
    top = response["predictions"][0]["index"]
    if top != case["top1"]:
        raise E2EError(f"{case['file']}: top-1 {top}, golden {case['top1']}")
    if "logits" in response:
        diff = max(abs(a - b) for a, b in zip(response["logits"], case["logits"], strict=True))
        if diff > tolerance:
            raise E2EError(f"{case['file']}: logits differ by {diff:.2e} > tolerance {tolerance}")
        return diff
    return 0.0


def check_golden(base: str, package: Path) -> tuple[int, float]:
    golden = json.loads((package / "golden" / "golden.json").read_text())
    worst = 0.0
    for case in golden["cases"]:
        response = predict(base, case["task"], (package / case["file"]).read_bytes())
        worst = max(worst, check_case(response, case, golden["tolerance"]))
    return len(golden["cases"]), worst


def raw_request_head(base: str, task: str, length: int) -> tuple[socket.socket, bytes]:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/experts/{task}/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in AUTH.items())
        + "\r\n"
    ).encode()
    return sock, head


def check_drain(container: Container, package: Path) -> float:
    """SIGTERM while a request is in flight: the request still gets its answer, then exit 0."""
    golden = json.loads((package / "golden" / "golden.json").read_text())
    case = golden["cases"][0]
    png = (package / case["file"]).read_bytes()
    sock, head = raw_request_head(container.base, case["task"], len(png))
    sock.sendall(head + png[: len(png) // 2])  # the server now holds an unfinished request
    time.sleep(0.3)
    signalled = time.monotonic()
    docker("kill", "--signal", "TERM", container.name)
    deadline = time.monotonic() + 10
    while DRAIN_LOG not in container.logs():
        if time.monotonic() > deadline:
            raise E2EError(f"no '{DRAIN_LOG}' log line after SIGTERM:\n{container.logs()[-2000:]}")
        time.sleep(0.05)
    if not container.state()["Running"]:
        raise E2EError("the container exited with a request still in flight (no drain)")
    sock.sendall(png[len(png) // 2 :])
    response = b""
    while chunk := sock.recv(65536):
        response += chunk
    sock.close()
    head_line, _, rest = response.partition(b"\r\n")
    if b" 200 " not in head_line:
        raise E2EError(f"in-flight request during drain got {head_line!r}")
    body = rest.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in rest.split(b"\r\n\r\n", 1)[0].lower():
        body = dechunk(body)
    check_case(json.loads(body), case, golden["tolerance"])
    code = int(docker("wait", container.name))
    stopped = time.monotonic() - signalled
    logs = container.logs()
    if code != 0:
        raise E2EError(f"exit code {code} after SIGTERM:\n{logs[-2000:]}")
    if DRAIN_TIMEOUT_LOG in logs:
        raise E2EError("the drain timed out although the only request had finished")
    return stopped


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def subset_package(package: Path, into: Path) -> tuple[Path, list[str]]:
    """A copy of `package` without its last task: a different, still valid package."""
    target = into / "subset"
    shutil.copytree(package, target)
    manifest = json.loads((target / "manifest.json").read_text())
    dropped = manifest["tasks"].pop()
    (target / dropped["file"]).unlink()
    manifest["files"].pop(dropped["file"])
    manifest["name"] = f"{manifest['name']}-subset"
    # golden.json keeps its cases; only its hash matters to readers (it is unchanged).
    for path, digest in manifest["files"].items():
        if hashlib.sha256((target / path).read_bytes()).hexdigest() != digest:
            raise E2EError(f"{path}: hash mismatch in the copied package")
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for path in [target, *target.rglob("*")]:  # readable by the image's non-root user
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target, [t["id"] for t in manifest["tasks"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--package", required=True, type=Path, help="host copy of the package baked into the image")
    parser.add_argument("--name", default=f"lorkd-e2e-{os.getpid()}", help="container name (unique per run)")
    parser.add_argument("--env-file", help="LORKD_* settings for the main container (the Kubernetes ConfigMap's)")
    args = parser.parse_args()
    package = args.package.resolve()
    containers: list[Container] = []
    try:
        keys_dir = Path(tempfile.mkdtemp(prefix="lorkd-e2e-keys-"))
        key = f"e2e-{os.urandom(12).hex()}"
        (keys_dir / "api-keys").write_text(f"# e2e\n{key}\n")
        os.chmod(keys_dir, 0o755)
        os.chmod(keys_dir / "api-keys", 0o444)
        extra = []
        if args.env_file:
            env_text = Path(args.env_file).read_text()
            extra = ["--env-file", args.env_file, "-v", f"{keys_dir}:/etc/lorkd/keys:ro"]
            if "LORKD_OPS_PORT=9090" in env_text:
                extra += ["-e", "LORKD_OPS_PORT=9090"]
        c = Container(args.image, args.name, extra)
        containers.append(c)
        ready_s = c.wait_ready()
        print(f"e2e: cold start to ready: {ready_s:.2f}s (docker run -> first 200 on /v2/health/ready)")
        inside = c.exec_to_ready()
        if inside is not None:
            print(f"e2e: of which lorkd itself, container start -> 'ready' log line: {inside:.2f}s")
        c.wait_healthy()
        print("e2e: docker HEALTHCHECK reports healthy")
        if args.env_file:
            # The Kubernetes settings turn API keys on: without the key the API answers 401, probes stay open.
            status, _ = http("GET", f"{c.base}/v1/experts")
            ready, _ = http("GET", f"{c.base}/v2/health/ready")
            if status != 401 or ready != 200:
                raise E2EError(f"without a key: /v1/experts {status} (want 401), ready {ready} (want 200)")
            AUTH["Authorization"] = f"Bearer {key}"
            print("e2e: API keys from the mounted key file: 401 without, 200 with; probes open")
        status, body = http("GET", f"{c.ops_base}/v1/info")
        info = json.loads(body)
        if status != 200 or info["runtime"]["provider"] != "cpu" or "/opt/lorkd" in body.decode():
            raise E2EError(f"/v1/info: {status} {body[:500]!r}")
        print(f"e2e: /v1/info (ops port): package {info['package']['name']}, provider {info['runtime']['provider']}")
        cases, worst = check_golden(c.base, package)
        print(f"e2e: {cases} golden images predicted, top-1 all equal, max |logit - golden| = {worst:.2e}")
        status, body = http("GET", f"{c.ops_base}/metrics")
        if status != 200 or b"# TYPE" not in body:
            raise E2EError(f"/metrics: {status} {body[:200]!r}")
        print(f"e2e: /metrics answers ({len(body.splitlines())} lines)")
        stopped = check_drain(c, package)
        print(
            f"e2e: SIGTERM with a request in flight: request answered, '{DRAIN_LOG}' logged, exit 0 after {stopped:.2f}s"
        )

        with tempfile.TemporaryDirectory(prefix="lorkd-e2e-") as tmp:
            other, tasks = subset_package(package, Path(tmp))
            mount = ["-v", f"{other}:/packages/custom:ro", "-e", "LORKD_PACKAGE=/packages/custom"]
            AUTH.clear()  # this container runs with the image's defaults: no keys
            c2 = Container(args.image, f"{args.name}-mounted", mount)
            containers.append(c2)
            c2.wait_ready()
            status, body = http("GET", f"{c2.base}/v1/experts")
            listed = sorted(e["id"] for e in json.loads(body)["experts"])
            if status != 200 or listed != sorted(tasks):
                raise E2EError(f"mounted package: experts {listed}, expected {sorted(tasks)}")
            golden = json.loads((other / "golden" / "golden.json").read_text())
            case = next(c for c in golden["cases"] if c["task"] in tasks)
            check_case(predict(c2.base, case["task"], (other / case["file"]).read_bytes()), case, golden["tolerance"])
            docker("stop", "-t", "40", c2.name)
            if int(docker("inspect", "-f", "{{.State.ExitCode}}", c2.name)) != 0:
                raise E2EError(f"mounted-package container did not exit 0:\n{c2.logs()[-2000:]}")
            print(
                f"e2e: a mounted package (LORKD_PACKAGE=/packages/custom, {len(tasks)} experts) serves; docker stop -> exit 0"
            )
    except (E2EError, KeyError, ValueError, OSError) as err:
        print(f"e2e: FAILED: {err}")
        return 1
    finally:
        for container in containers:
            container.remove()
    print("e2e: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
