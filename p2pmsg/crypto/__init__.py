"""Cryptographic protocols on PyNaCl: Noise XX, signed envelopes, boxes (sans-IO)."""
