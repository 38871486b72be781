"""Identity and access: who may do what in which registry.

- ``secrets``: salted slow hashes (scrypt) of passwords and client secrets,
  compared in constant time; secrets are never stored or logged in clear.
- ``scopes``: the Docker token scopes (``repository:team/app:pull,push``)
  and the actions of ACR's roles and scope maps.
- ``identities``: the identities (cluster owner, a registry's admin user,
  service principals, repository-scoped tokens, anonymous pull) and what
  each may do: ``grant`` narrows the scopes a client asks for to those its
  identity holds.
- ``tokens``: short-lived access tokens as signed JWTs (EdDSA, with ``kid``),
  signing keys that rotate without downtime, and a verifier that caches what
  it has verified so the request path does no signature work per request.

Everything lives in the namespace (``cluster.namespace``), so every region
accepts the same identities and the tokens any region issued.
"""
