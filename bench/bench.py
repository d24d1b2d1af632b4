"""The benchmark of docs/benchmarks.md: `python bench/bench.py --patients 100000 [--json]`.

A thin wrapper of `worker.devtools.bench.run_bench` (also `oprecon bench`), for running it from a
checkout without installing the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.devtools.bench import run_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--pg-url", default=None,
                        help="PostgreSQL admin URL to create the throw-away database with")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the generated practice and state DBs here")
    args = parser.parse_args(argv)
    run_bench(patients=args.patients, as_json=args.json, pg_url=args.pg_url, keep=args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
