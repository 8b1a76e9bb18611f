"""Wire formats: the strict msgpack codec and multiaddrs (sans-IO)."""
