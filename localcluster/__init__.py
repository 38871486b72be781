"""The local cluster: ``meridian up`` (etcd, one node per region, the WAN
emulator, the router, on loopback), its topology files, the WAN emulator and
the one process supervisor that ``meridian up``, the load tests and the tests
start their processes with."""
