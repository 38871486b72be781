"""Audit records: ``cluster.audit`` (the router keeps them too, so the module
lives in cluster core). ``node.audit`` is the same module object."""

import sys

from cluster import audit as _audit

sys.modules[__name__] = _audit
