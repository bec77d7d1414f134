"""One module per method; importing this package fills the registry. Add new modules to the list below."""

from . import linear, task_arithmetic, weight_average  # noqa: F401
