"""Transports (TCP, WebSocket), the secure channel and the dialer."""
