"""`python -m worker.devtools.generator`: the same as `oprecon generate`."""

from worker.devtools.generator.writer import main

if __name__ == "__main__":
    raise SystemExit(main())
