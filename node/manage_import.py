"""The management API's import route (``node.importer`` does the copy):

- ``POST /meridian/v1/registries/{r}/import`` ``{source, image?, username?,
  password?, force?}``: copy ``source`` (``host[:port]/repo:tag`` or
  ``...@sha256:...``; ``http://`` first for a plain-HTTP registry) into
  registry ``r`` as ``image`` (``REPO:TAG``, or ``REPO`` to keep the
  source's tag; none: the source's repository and tag). The node that takes
  the call copies, and answers when the image is committed: ``201`` with
  the digest and what was copied (manifests, blobs, bytes, platforms).
  Its manifests commit through the push's path (with a push's webhook
  events); the audit log records the call.
  ``force`` overwrites an existing tag (else ``409``).

Callers: those who manage the registry (the cluster owner, a service
principal with ``Owner`` on it). The source's credentials are used for this
copy only: never stored, logged or echoed.
"""

from __future__ import annotations

from functools import partial

from aiohttp import web

from cluster.auth.admin import Invalid
from node.importer import Importer, Request
from node.manage import PREFIX, ManageAPI, api_handler

FIELDS = ("source", "image", "username", "password", "force")
IMPORTER_KEY = web.AppKey("meridian_importer", Importer)


@api_handler
async def import_image(api: ManageAPI, request: web.Request) -> web.Response:
    reg, caller = await api.manager(request)
    doc = await api.body(request, FIELDS)
    req = Request.from_doc(doc)
    importer = request.app.get(IMPORTER_KEY)
    if importer is None:
        raise Invalid("this server does not serve content: import through a registry node")
    out = await importer.run(reg, req)
    api.audit(caller, f"imported {out['source']} into {reg}/{out['image']} ({out['digest']})")
    return api.ok(out, 201)


def add_routes(api: ManageAPI, app: web.Application) -> None:
    if api.node is not None:
        app[IMPORTER_KEY] = Importer(api.node.registry, api.node.cfg.max_blob_size)
    app.router.add_post(PREFIX + "/registries/{registry}/import", partial(import_image, api))
