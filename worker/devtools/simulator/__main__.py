"""`python -m worker.devtools.simulator`: one command starts the portal simulator."""

from worker.devtools.simulator.server import main

raise SystemExit(main())
