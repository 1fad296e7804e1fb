"""The torch networks of the methods, one module per method (plus the shared pools).

They live apart from the stage modules (``rail.estimation.algos.deepz_*``) so that
``import rail.deepz`` (RAIL's stage discovery, the ``rail`` CLI, and the metric path of
``deepz-compare``) does not import torch: a stage imports its network module, torch with it,
only when it trains or estimates.
"""
