"""The internal API: what fastbn.layers and fastbn.distributed build on, and nothing else.

Private to the package (no promise to users), but a promise between its modules: these names
keep their meaning when the modules behind them change.
"""
from ._batchnorm import BatchStats, backward, forward, normalize_with, run_backward
from ._checks import (
    DATA_DTYPES,
    activation_value,
    check_backward,
    check_forward,
    eps_value,
    flag,
    too_few_values,
)
from ._moments import Moments, batch_moments, merge, variances

__all__ = [
    "DATA_DTYPES", "activation_value", "eps_value", "flag",  # argument checks
    "check_forward", "check_backward",  # a whole call checked: converted, and its device
    "forward", "backward", "BatchStats",  # the public ops
    "normalize_with", "run_backward",  # a checked call run with given statistics or sums
    "Moments", "batch_moments", "merge", "variances",  # mergeable statistics
    "too_few_values",  # the error of training on one value per channel
]
