"""zerograph's graph passes, one module per pass, and the default pipeline (order is data).

The pass functions live in modules named after them
(``zerograph.passes.lower_markers.lower_markers``); this package exports the
pass infrastructure and :func:`default_passes`.
"""

from __future__ import annotations

from zerograph.passes.default import default_passes
from zerograph.passes.manager import GraphPass, PassContext, PassList, PassRecord, PassResult, run_passes

__all__ = [
    "GraphPass",
    "PassContext",
    "PassList",
    "PassRecord",
    "PassResult",
    "default_passes",
    "run_passes",
]
