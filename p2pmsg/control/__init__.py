"""The local control API: a Unix socket in the node's home directory."""
