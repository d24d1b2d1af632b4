"""`python -m worker.simulator`: one command starts the portal simulator."""

from worker.simulator.server import main

raise SystemExit(main())
