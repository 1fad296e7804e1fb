"""pz-rail-deepz: deep-learning photo-z estimators for RAIL.

Importing this package registers every stage with RAIL (``rail`` discovers plugins
through the regular package ``rail.<pkg>``). Shared building blocks live in the
submodules: :mod:`.photometry`, :mod:`.scaling`, :mod:`.mixtures`, :mod:`.training`,
:mod:`.pdf`, :mod:`.stages`.

The stage modules are imported as modules (not ``from ... import Name``) because they
themselves import this package's submodules: whichever is imported first, the other
finds a registered, possibly partially initialised module instead of a circular error.
"""

from ._version import __version__

import rail.estimation.algos.deepz_nnc  # noqa: E402,F401

#: stage name -> module defining it (for discovery and documentation)
STAGE_MODULES = {
    "DeepzNNCInformer": "rail.estimation.algos.deepz_nnc",
    "DeepzNNCEstimator": "rail.estimation.algos.deepz_nnc",
}


def __getattr__(name):
    if name in STAGE_MODULES:
        import importlib

        return getattr(importlib.import_module(STAGE_MODULES[name]), name)
    raise AttributeError(f"module 'rail.deepz' has no attribute {name!r}")
