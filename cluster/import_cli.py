"""``meridian import``: a server-side copy of an image from any OCI registry
into a registry of the cluster (``az acr import``), over the management
API's ``POST /meridian/v1/registries/{r}/import`` (``node/manage_import.py``).

    meridian import --source registry.example.com/lib/app:1 --image app:1
    meridian import --source http://127.0.0.1:5001/lib/app@sha256:... --image app
    echo "$PW" | meridian import --source ghcr.io/org/tool:2 --username me --password-stdin

The node that takes the call fetches the image (a multi-platform index with
every platform), verifies every digest and commits it; this command waits
for it and prints the digest and what was copied. The source's password
comes from stdin (``--password-stdin``) or ``MERIDIAN_SOURCE_PASSWORD``,
never from a flag. Server, registry, output and exit codes as the other
verbs (``cluster.manage_cli``); a source that does not answer or answers
wrongly is exit code 1, one it does not have is 6, credentials it refuses 5,
an existing tag without ``--force`` 7.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import urllib.error
from typing import Any

from cluster import dockerconfig
from cluster.manage_cli import Api, Column, Ctx, Parser, common_flags, emit, find_server
from cluster.preflight import DENIED, FAILED, NOT_FOUND, OK, USAGE, CliError, answer

PASSWORD_ENV = "MERIDIAN_SOURCE_PASSWORD"
DEFAULT_TIMEOUT = 3600.0

COLUMNS: list[Column] = [
    ("Image", lambda d: d["image"]),
    ("Digest", lambda d: d["digest"]),
    ("Manifests", lambda d: d["manifests"]),
    ("Blobs", lambda d: d["blobs"]),
    ("Copied", lambda d: d["blobs_copied"]),
    ("Bytes", lambda d: d["bytes_copied"]),
    ("Platforms", lambda d: d.get("platforms")),
]

# The source's answers (node.importer), as exit codes.
SOURCE_CODES = {
    "SOURCE_NOT_FOUND": NOT_FOUND,
    "SOURCE_DENIED": DENIED,
    "SOURCE_UNREACHABLE": FAILED,
    "SOURCE_FAILED": FAILED,
}


class ImportApi(Api):
    """Errors about the source are the source's, not the server's."""

    def refused(
        self, e: urllib.error.HTTPError, path: str, creds: tuple[str, str] | None
    ) -> CliError:
        raw = e.read()
        try:
            err = json.loads(raw)["errors"][0]
            code, message = str(err.get("code", "")), " ".join(str(err["message"]).split())
        except (ValueError, KeyError, IndexError, TypeError):
            code, message = "", ""
        if code in SOURCE_CODES:
            return CliError(message, SOURCE_CODES[code])
        again = urllib.error.HTTPError(e.url, e.code, e.msg, e.headers, io.BytesIO(raw))
        return super().refused(again, path, creds)


def _password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        if not args.username:
            raise CliError("--password-stdin needs --username", USAGE)
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: no password on stdin", USAGE)
        return password
    if not args.username:
        return None
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        raise CliError(
            f"--username needs the source's password: pipe it to --password-stdin or set "
            f"{PASSWORD_ENV}",
            USAGE,
        )
    return password


def run(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"source": args.source, "force": args.force}
    if args.image:
        body["image"] = args.image
    password = _password(args)
    if password is not None:
        body["username"], body["password"] = args.username, password
    server = find_server(args.server)
    api = ImportApi(server, dockerconfig.credentials(server.host, server.url))
    ctx = Ctx(args, server, api)
    doc = api.call("POST", ctx.reg_path("import"), body, timeout=args.timeout)
    emit(args.output, doc, [doc], COLUMNS)
    return OK


def main(argv: list[str]) -> int:
    p = Parser(
        prog="meridian import",
        description="copy an image (every platform of an index, digests kept) from any OCI "
        "registry into a registry, server-side",
        parents=[common_flags(registry=True)],
    )
    p.add_argument(
        "--source",
        required=True,
        help="REGISTRY/REPO:TAG or REGISTRY/REPO@DIGEST (https; http://REGISTRY/... for a "
        "plain-HTTP registry; Docker Hub is docker.io/library/NAME:TAG)",
    )
    p.add_argument(
        "-t",
        "--image",
        help="the target REPO:TAG, or REPO to keep the source's tag (default: the source's "
        "repository and tag)",
    )
    p.add_argument("-u", "--username", help="the source registry's user name")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the source's password from stdin (else from {PASSWORD_ENV})",
    )
    p.add_argument("--force", action="store_true", help="overwrite the target tag if it exists")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds to wait for the copy (default {DEFAULT_TIMEOUT:g})",
    )
    args = p.parse_args(argv)
    return answer("meridian import", lambda: run(args))
