"""OP Portal simulator: the admin API of `worker/sources/openapi/portal.yaml`, with the delay.

Used by the demo and the end-to-end tests in place of a real portal. Start it with
`python -m worker.devtools.simulator --portal-dir DIR`, or in-process with `start_simulator()`.
"""

from worker.devtools.simulator.clock import SimClock
from worker.devtools.simulator.server import FaultPlan, SimulatorServer, main, start_simulator
from worker.devtools.simulator.store import PortalStore, Simulator, expected_links_from_op

__all__ = [
    "FaultPlan",
    "PortalStore",
    "SimClock",
    "Simulator",
    "SimulatorServer",
    "expected_links_from_op",
    "main",
    "start_simulator",
]
