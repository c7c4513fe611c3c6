"""Starts the real lorkd binary (debug build, real ONNX Runtime, shipped package) on an ephemeral port."""

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
PACKAGE = Path(os.environ.get("LORKD_TEST_PACKAGE", ROOT / "models" / "medmnist-lorkd"))
BINARY = Path(os.environ.get("LORKD_BINARY", ROOT / "target" / "debug" / "lorkd"))


class Server:
    def __init__(self, *extra: str):
        env = dict(os.environ)
        env.setdefault("ORT_DYLIB_PATH", str(ROOT / ".ort" / "lib" / "libonnxruntime.so.1.31.1"))
        env = {k: v for k, v in env.items() if not k.startswith("LORKD_")}
        args = [str(BINARY), "--package", str(PACKAGE), "--host", "127.0.0.1", "--port", "0"]
        args += ["--intra-op-threads", "1", "--log-format", "json", "--log", "info", *extra]
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        self.address = None
        self.listening = threading.Event()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        if not self.listening.wait(timeout=60):
            self.process.kill()
            raise AssertionError("lorkd did not start:\n" + "".join(self.log))
        deadline = time.monotonic() + 60
        self.url = f"http://{self.address}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("lorkd never became ready")

    def _drain(self):
        for line in self.process.stdout:
            self.log.append(line)
            if self.address is None:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                fields = {**record, **record.get("fields", {})}
                if fields.get("message") == "listening":
                    self.address = fields["address"]
                    self.listening.set()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        self.reader.join(timeout=5)


@pytest.fixture(scope="session")
def server():
    assert BINARY.exists(), f"build the server first: cargo build --bin lorkd ({BINARY} missing)"
    running = Server()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def manifest():
    return json.loads((PACKAGE / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden():
    return json.loads((PACKAGE / "golden" / "golden.json").read_text())


def pytest_terminal_summary(terminalreporter):
    from test_dicom_reference import AGREEMENT

    if AGREEMENT:
        terminalreporter.write_line("max |server - pydicom| per answered DICOM case (in 1/255 units):")
        for case, diff in AGREEMENT.items():
            terminalreporter.write_line(f"  {diff}  {case}")
