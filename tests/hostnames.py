"""Host names for clients in tests, without touching the machine's /etc/hosts.

A registry answers on ``<name>.<domain>``; Go clients (skopeo, ctr) resolve
names through ``/etc/hosts`` and DNS only (``*.localhost`` is not special to
them). ``with_hosts`` runs a command in a private mount namespace
(``unshare --mount``) where a hosts file of the test's own is bind-mounted
over ``/etc/hosts``: the command sees the names, nothing else on the machine
does, and nothing is left behind. Needs root (the tests run as root) and
``unshare``/``mount`` from util-linux.

    r = with_hosts({"myreg1.meridian.test": "127.0.0.1"}, ["skopeo", "inspect", ...])
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence

INSTALL = "apt-get install -y util-linux"
BASE = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
# $0: the hosts file; "$@": the command. exec keeps the exit status.
SCRIPT = 'mount --bind "$0" /etc/hosts && exec "$@"'


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: {INSTALL}")
    return path


def hosts_text(names: Mapping[str, str]) -> str:
    """A hosts file: loopback's usual lines, then ``address name`` per name."""
    return BASE + "".join(f"{addr} {name}\n" for name, addr in names.items())


def with_hosts(
    names: Mapping[str, str],
    args: Sequence[str],
    *,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` where ``names`` (host name -> address) resolve, in a
    private mount namespace; the machine's /etc/hosts is never changed."""
    unshare = _tool("unshare")
    _tool("mount")
    if os.geteuid() != 0:
        raise RuntimeError("a private /etc/hosts needs root (unshare --mount): run as root")
    with tempfile.NamedTemporaryFile("w", prefix="hosts-", suffix=".txt", delete=False) as f:
        f.write(hosts_text(names))
        path = f.name
    try:
        os.chmod(path, 0o644)
        return subprocess.run(
            [unshare, "--mount", "--propagation", "private", "sh", "-c", SCRIPT, path, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=check,
        )
    finally:
        os.unlink(path)
