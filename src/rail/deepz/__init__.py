"""pz-rail-deepz: deep-learning photo-z estimators for RAIL.

Importing this package registers every stage with RAIL (``rail`` discovers plugins
through the regular package ``rail.<pkg>``). Shared building blocks live in the
submodules: :mod:`.photometry`, :mod:`.scaling`, :mod:`.mixtures`, :mod:`.training`,
:mod:`.pdf`, :mod:`.stages`, :mod:`.datasets`, :mod:`.som`, :mod:`.som_options`;
torch-free: :mod:`.gmm` (NumPy mixtures) and :mod:`.trainconfig` (training options).

The stage modules are imported as modules (not ``from ... import Name``) because they
themselves import this package's submodules: whichever is imported first, the other
finds a registered, possibly partially initialised module instead of a circular error.
One line per method module follows.
"""

from ._version import __version__  # noqa: F401

import rail.estimation.algos.deepz_nnc  # noqa: E402,F401
import rail.estimation.algos.deepz_embed  # noqa: E402,F401
import rail.estimation.algos.deepz_somflag  # noqa: E402,F401
import rail.estimation.algos.deepz_lstm  # noqa: E402,F401
import rail.estimation.algos.deepz_cnn  # noqa: E402,F401
import rail.estimation.algos.deepz_scene  # noqa: E402,F401
import rail.estimation.algos.deepz_stack  # noqa: E402,F401
