"""Conversations, envelopes, outbox, receipts and the message-request policy."""
