"""Blob storage: the interface (``base``) and its drivers (``filesystem``,
``readthrough``)."""
