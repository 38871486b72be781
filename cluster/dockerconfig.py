"""Stored credentials, as docker keeps them, for ``meridian login``.

Credentials go to ``${DOCKER_CONFIG:-~/.docker}/config.json`` under
``auths.<host[:port]>.auth`` (base64 of ``user:password``): the file and
format docker, podman, skopeo, crane and containerd's tools read, so one
``meridian login`` serves them all. The file is written whole to a
temporary file and renamed (mode 0600, its directory 0700); every other
entry and key in it is kept.

Which server the ``meridian`` verbs talk to by default (the last one logged
in to) and its registry are the CLI's own choice, kept apart in
``${XDG_CONFIG_HOME:-~/.config}/meridian/cli.json``, so that docker
rewriting its file loses nothing of ours.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cluster.preflight import USAGE, CliError


def docker_config_path() -> Path:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


def cli_state_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "meridian" / "cli.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise CliError(f"{path} cannot be read ({e}); fix or remove it", USAGE) from None
    if not isinstance(doc, dict):
        raise CliError(f"{path} is not a JSON object; fix or remove it", USAGE)
    return doc


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Whole or not at all, readable by this user only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(doc, f, indent="\t")
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _keys(host: str, url: str) -> list[str]:
    """The ``auths`` keys that may name a server: docker writes the bare
    ``host:port``; older files hold URLs."""
    return [host, url.rstrip("/"), f"https://{host}", f"http://{host}"]


def credentials(host: str, url: str) -> tuple[str, str] | None:
    """(user, password) stored for the server, or None."""
    auths = _read(docker_config_path()).get("auths") or {}
    for key in _keys(host, url):
        entry = auths.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                continue
            if sep:
                return user, password
    return None


def store(host: str, user: str, password: str) -> Path:
    path = docker_config_path()
    doc = _read(path)
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = doc["auths"] = {}
    entry = auths.get(host) if isinstance(auths.get(host), dict) else {}
    entry.pop("identitytoken", None)
    entry["auth"] = base64.b64encode(f"{user}:{password}".encode()).decode()
    auths[host] = entry
    _write(path, doc)
    return path


def creds_store(host: str) -> str | None:
    """A credential helper docker would ask for ``host`` instead of ``auths``."""
    doc = _read(docker_config_path())
    helpers = doc.get("credHelpers") or {}
    return (helpers.get(host) if isinstance(helpers, dict) else None) or doc.get("credsStore")


def forget(host: str, url: str) -> bool:
    """Remove the server's stored credentials; False when there were none."""
    path = docker_config_path()
    doc = _read(path)
    auths = doc.get("auths") or {}
    found = [k for k in _keys(host, url) if k in auths]
    for k in found:
        del auths[k]
    if found:
        _write(path, doc)
    state = _read(cli_state_path())
    servers = state.get("servers") if isinstance(state.get("servers"), dict) else {}
    if state.get("current") == host or host in servers:
        servers.pop(host, None)
        if state.get("current") == host:
            state.pop("current")
        _write(cli_state_path(), state)
    return bool(found)


def remember(host: str, url: str, registry: str) -> None:
    """The server the verbs talk to from now on, and its registry."""
    state = _read(cli_state_path())
    servers = state.get("servers") if isinstance(state.get("servers"), dict) else {}
    servers[host] = {"url": url, "registry": registry}
    state["servers"] = servers
    state["current"] = host
    _write(cli_state_path(), state)


def current() -> tuple[str, dict[str, str]] | None:
    """(host, {"url", "registry"}) of the server last logged in to."""
    state = _read(cli_state_path())
    host = state.get("current")
    servers = state.get("servers") or {}
    if isinstance(host, str) and isinstance(servers.get(host), dict):
        return host, servers[host]
    return None


def known(host: str) -> dict[str, str] | None:
    servers = _read(cli_state_path()).get("servers") or {}
    entry = servers.get(host) if isinstance(servers, dict) else None
    return entry if isinstance(entry, dict) else None
