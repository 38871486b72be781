"""The OCI Distribution vocabulary every part of Meridian speaks.

Digests and names (``digests``), media types (``mediatypes``), the typed
error codes and their JSON body (``errors``), and the URL grammar of the
``/v2/`` API with registry selection by ``Host`` (``paths``). The node, the
router, the load tests and the tests import these; nothing here imports any
other part of Meridian, so it sits at the bottom of the layering.
"""
