"""Kademlia DHT, wire-compatible with the PyPI ``kademlia`` package, with signed records.

* :mod:`p2pmsg.dht.core` -- the sans-IO protocol: datagrams (``messages``), routing table (``routing``), iterative
  lookup (``lookup``), bounded store (``storage``), signed records (``records``), rate limits and the
  anti-amplification guard (``limits``), and the engine tying them together (``engine``, events in ``events``).
* :mod:`p2pmsg.dht.service` -- :class:`~p2pmsg.dht.service.DhtNode`, the trio UDP driver
  (``open_dht_node(identity)`` then ``bootstrap``, ``get``/``set``, ``publish_peer_record``, ``find_peer``).

The byte-level formats are in ``docs/protocol.md`` (DHT part).
"""
