__version__ = "0.1.0"
# `qllava.train` and `python -m qllava.train` (the flat layout's names) still work: see qllava.core.FlatNames
from .core import keep_flat_names as _keep_flat_names
_keep_flat_names()
