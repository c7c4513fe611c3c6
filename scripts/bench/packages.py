#!/usr/bin/env python3
"""Two packages side by side on one lorkd binary: what a package change costs to serve (issue 13).

    packages.py --old /tmp/old-package --new models/medmnist-lorkd

Starts one server per (package, execution path), all at once: `--execution merged` with dedicated sessions off (every
request feeds the assembled weights to the shared graph), the same with the expert promoted to a dedicated session
(weights baked in, so onnxruntime folds what follows a conv into it), and `--execution mixed`; wrk -c32 on one expert's
native predict, warmed, then `--repeats` interleaved rounds. Also each package's bytes of one assembled expert and
each server's resident memory after the rounds. Writes <out>/packages.json (medians and every round).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the package before the change")
    p.add_argument("--new", type=Path, default=Path("models/medmnist-lorkd"))
    p.add_argument("--binary", type=Path, default=Path("target/release/lorkd"))
    p.add_argument("--task", default="retina")
    p.add_argument("--seconds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench-out/packages"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    paths = {"merged": ["--execution", "merged", "--dedicated-sessions", "0"],
             "dedicated": ["--execution", "merged", "--promote-after", "1", "--dedicated-sessions", "64"],
             "mixed": ["--execution", "mixed"]}
    servers: dict[str, e2e.Server] = {}
    try:
        for which, pkg in (("old", a.old), ("new", a.new)):
            for path, extra in paths.items():
                servers[f"{which}_{path}"] = e2e.Server(a.binary, pkg, extra, a.out, f"{which}-{path}")
        plan = []
        for key, server in servers.items():
            pkg = a.old if key.startswith("old") else a.new
            kw = dict(body=pkg / "golden" / a.task / "0.png", content_type="image/png", path_fmt=e2e.NATIVE,
                      task=a.task, connections=32)
            e2e.wrk(server, **kw, seconds=2)  # warm: expert assembled / bank slot filled, arenas grown
            plan.append((key, server, dict(kw, seconds=a.seconds)))
        res = e2e.interleaved(plan, a.repeats)
        for key, server in servers.items():
            res[key]["memory"] = server.memory()
    finally:
        for server in servers.values():
            server.stop()
    for which, pkg in (("old", a.old), ("new", a.new)):
        manifest = json.loads((pkg / "manifest.json").read_text())
        res[f"{which}_package"] = {"path": str(pkg), "expert_bytes": e2e.expert_bytes(manifest),
                                   "layers": len(manifest["layers"]),
                                   "expert_file_bytes": (pkg / "experts" / f"{a.task}.safetensors").stat().st_size}
    for key, v in res.items():
        if "rps" in v:
            print(f"{key:<11} {v['rps']:8.1f} req/s  p50 {v['p50_ms']:7.2f}  p99 {v['p99_ms']:7.2f} ms  "
                  f"rss {v['memory'].get('VmRSS', 0) / 2**20:6.1f} MiB  rounds {v['rps_runs']}")
        else:
            print(key, v)
    (a.out / "packages.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
