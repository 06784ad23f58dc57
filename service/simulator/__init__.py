"""A describeImages simulator for tests, the demo and the benchmark.

Never imported by production code. It behaves like JD Cloud's
``GET /v1/regions/{regionId}/images``: the documented filters, paging, errors and
JDCLOUD3-HMAC-SHA256 signature checks, over a catalogue generated from a seed that
can change while it runs, with injectable faults (latency, 429/5xx, dropped
connections, broken bodies, drift between pages).

- ``catalogue.Catalogue``: the images and their mutations;
- ``faults.FaultConfig`` / ``faults.Faults``: what goes wrong and how often;
- ``server.build_app`` / ``server.running_simulator`` / ``server.simulator_in_thread``;
- ``cli.add_arguments`` / ``cli.run``: ``image-sync simulate``.
"""

from service.simulator.catalogue import Catalogue, ListingQuery
from service.simulator.faults import FailFirst, Fault, FaultConfig, Faults
from service.simulator.server import Simulator, build_app, running_simulator, simulator_in_thread

__all__ = [
    "Catalogue",
    "FailFirst",
    "Fault",
    "FaultConfig",
    "Faults",
    "ListingQuery",
    "Simulator",
    "build_app",
    "running_simulator",
    "simulator_in_thread",
]
