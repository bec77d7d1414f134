"""One module per method; importing this package fills the registry. Add new modules to the list below."""

from . import (  # noqa: F401
    breadcrumbs,
    dare_linear,
    dare_ties,
    della,
    iso_c,
    iso_cts,
    linear,
    model_stock,
    optmerge,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    weight_average,
    wudi,
)
