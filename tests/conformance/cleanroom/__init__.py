"""Clean-room p2pmsg protocol code for the conformance suite.

Written from docs/protocol.md alone. Nothing here may import from p2pmsg or from the other test folders (tests/unit,
tests/system, ...): the point of the suite is that an independent reading of the document talks to a real node.
Only the standard library, PyNaCl and msgpack are used.
"""
