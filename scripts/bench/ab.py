#!/usr/bin/env python3
"""Single-expert throughput of two lorkd binaries side by side (issue 8: "no worse than today").

    ab.py --old bench-out/lorkd-old --new target/release/lorkd

Runs the old binary with default flags and the new one with `--execution auto` and `--execution merged`, all three
servers at once, wrk -c32 on one expert's native predict, warmed, then `--repeats` interleaved rounds; writes
<out>/ab.json (medians and every round). Build the old binary from the earlier commit first (e.g. a git worktree
and `cargo build --release --bin lorkd`).
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
    p.add_argument("--old", type=Path, required=True)
    p.add_argument("--new", type=Path, default=Path("target/release/lorkd"))
    p.add_argument("--package", type=Path, default=Path("models/medmnist-lorkd"))
    p.add_argument("--task", default="retina")
    p.add_argument("--seconds", type=int, default=6)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench-out/ab"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    png = a.package / "golden" / a.task / "0.png"
    kw = dict(body=png, content_type="image/png", path_fmt=e2e.NATIVE, task=a.task, connections=32)
    with e2e.Server(a.old, a.package, [], a.out, "old") as old, \
            e2e.Server(a.new, a.package, ["--execution", "auto"], a.out, "new-auto") as auto, \
            e2e.Server(a.new, a.package, ["--execution", "merged"], a.out, "new-merged") as merged:
        for s in (old, auto, merged):
            e2e.wrk(s, **kw, seconds=2)
        res = e2e.interleaved([("old", old, dict(kw, seconds=a.seconds)), ("new_auto", auto, dict(kw, seconds=a.seconds)),
                               ("new_merged", merged, dict(kw, seconds=a.seconds))], a.repeats)
    for k, v in res.items():
        print(f"{k:<11} {v['rps']:8.1f} req/s  p50 {v['p50_ms']:7.2f}  p99 {v['p99_ms']:7.2f} ms  rounds {v['rps_runs']}")
    (a.out / "ab.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
