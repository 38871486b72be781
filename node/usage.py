"""Usage accounting (``cluster.usage``: the router counts too, so it lives in
cluster core): the names the node's modules use."""

from cluster.usage import (  # noqa: F401 - re-exported
    DAY,
    FIELDS,
    GIB,
    Counters,
    UsageRecorder,
    add_recorder,
    close_region,
    figures,
    integrate,
    stored_in,
)
