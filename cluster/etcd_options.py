"""How a process reaches a locked-down etcd: TLS (a CA to trust etcd's
certificate, optionally a client certificate) and user/password
authentication, declared once as settings (``cluster.settings``).

``EtcdOptions`` is a settings mixin: a config that inherits it (the node's,
the router's) gets the flags ``--etcd-ca``, ``--etcd-cert``, ``--etcd-key``,
``--etcd-user``, ``--etcd-password`` and their ``MERIDIAN_*`` twins; the
management verbs (``meridian regions``, ``meridian replication list``) add
the same flags with :func:`add_arguments`. ``cluster.etcd.EtcdKV`` takes the
result (``etcd_options()``). The password is a ``Secret``: hidden from the
config's repr, never logged; pass it by ``MERIDIAN_ETCD_PASSWORD`` rather
than the flag (a flag shows in the process list).

Kept free of gRPC and etcd imports: configs import it at start-up.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from cluster import settings
from cluster.settings import Secret, setting


@dataclass
class EtcdOptions:
    etcd_ca: str = setting(
        "",
        "PEM CA file to verify etcd's certificate with; given: etcd is reached over TLS",
        show="the system's trusted roots for https:// endpoints",
    )
    etcd_cert: str = setting(
        "", "PEM client certificate to present to etcd (etcd --client-cert-auth)"
    )
    etcd_key: str = setting("", "PEM private key of --etcd-cert")
    etcd_user: str = setting("", "etcd user name (etcd auth enabled)")
    etcd_password: str = setting(
        "",
        "password of --etcd-user; prefer the environment variable: a flag shows in the "
        "process list",
        parse=Secret,
    )

    def etcd_options(self) -> EtcdOptions:
        """These options alone (a config that inherits them passes itself on)."""
        return EtcdOptions(
            etcd_ca=self.etcd_ca,
            etcd_cert=self.etcd_cert,
            etcd_key=self.etcd_key,
            etcd_user=self.etcd_user,
            etcd_password=Secret(self.etcd_password),
        )

    @property
    def etcd_tls(self) -> bool:
        """Whether the options ask for TLS (https:// endpoints do anyway)."""
        return bool(self.etcd_ca or self.etcd_cert)

    def etcd_problem(self, endpoints: str = "") -> str | None:
        """What is wrong with these options together (and with the
        comma-separated ``endpoints`` of ``--etcd``), or None (one line)."""
        if self.etcd_tls:
            for e in filter(None, (e.strip() for e in endpoints.split(","))):
                if e.startswith("http://"):
                    return (
                        f"etcd endpoint {e} is plain http:// but --etcd-ca/--etcd-cert ask "
                        "for TLS: write it https://"
                    )
        if bool(self.etcd_cert) != bool(self.etcd_key):
            return "--etcd-cert and --etcd-key go together"
        for flag, path in (
            ("--etcd-ca", self.etcd_ca),
            ("--etcd-cert", self.etcd_cert),
            ("--etcd-key", self.etcd_key),
        ):
            if path and not os.access(path, os.R_OK):
                return f"{flag}: cannot read {path}"
        if self.etcd_password and not self.etcd_user:
            return "an etcd password needs --etcd-user (or MERIDIAN_ETCD_USER)"
        if self.etcd_user and not self.etcd_password:
            return "--etcd-user needs a password: set MERIDIAN_ETCD_PASSWORD (or --etcd-password)"
        return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The etcd options as flags of a plain argparse parser."""
    settings.add_arguments(p, EtcdOptions)


def from_args(ns: argparse.Namespace) -> EtcdOptions:
    """The options from parsed flags (then environment); a problem is the
    parser's one-line usage error."""
    opts = settings.from_args(EtcdOptions, ns)
    problem = opts.etcd_problem()
    if problem is not None:
        parser = getattr(ns, "_settings_parser", None)
        if parser is None:
            raise ValueError(problem)
        parser.error(problem)
    return opts
