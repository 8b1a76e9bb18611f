"""The sans-IO Kademlia core: contacts, datagrams, routing table, lookups, record store, signed records, engine.

Nothing in this package performs I/O or imports ``trio``/``socket``: every class takes bytes, addresses and the
current time as arguments and returns bytes, addresses and events.  :mod:`p2pmsg.dht.service` drives it over UDP;
a simulator can drive the very same objects with a virtual clock.
"""
