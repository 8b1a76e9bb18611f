"""Kademlia DHT, wire-compatible with the PyPI ``kademlia`` package, with signed records."""
