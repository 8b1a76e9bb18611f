"""The ``p2pmsg`` command line; it talks to a running node only through the control API."""
