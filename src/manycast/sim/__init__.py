"""The simulator: pools too large to run live, on the memory driver's virtual clock.

generate.py    generated topologies (a core, server and client routers, many servers)
presets.py     named pools with a scenario and a modelled population
population.py  client addresses modelled by rates; their load by `owner_many`
memo.py        parse each distinct datagram once (large pools are affordable)
watch.py       what is sampled: who serves what, share error, load, traffic, breaks
run.py         `simulate`: the real nodes of `PoolRun`, sampled on the virtual clock
report.py      the JSON report and its readable summary
plots.py       the report's plots (matplotlib)
"""

from manycast.sim.generate import PoolShape, topology_text
from manycast.sim.memo import memoized_decoders
from manycast.sim.population import Population
from manycast.sim.presets import Preset, preset, presets
from manycast.sim.run import SimResult, SimSettings, simulate

__all__ = [
    "PoolShape",
    "Population",
    "Preset",
    "SimResult",
    "SimSettings",
    "memoized_decoders",
    "preset",
    "presets",
    "simulate",
    "topology_text",
]
