"""Reading the node's SQLite file (docs/protocol.md section 8).

Written from docs/protocol.md alone; imports nothing from p2pmsg or the other test folders.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path
from typing import Any

from .encoding import b58encode

APPLICATION_ID = 0x70326D73  # "p2ms"
TABLES = {"settings", "contacts", "message_requests", "messages", "outbox", "peer_records", "dht_nodes"}

# Section 8.4.9: a queued or sent message without an outbox row reads as delivered.
_MESSAGES = (
    "SELECT m.seq, m.message_id, m.conversation, m.direction, m.sender, m.text, m.sent_at, m.stored_at, "
    "CASE WHEN m.status IN ('queued', 'sent') AND o.seq IS NULL THEN 'delivered' ELSE m.status END, "
    "m.status, m.is_request FROM messages AS m LEFT JOIN outbox AS o ON o.seq = m.seq"
)


def read_store(db_path: Path, conversation: bytes | None = None) -> dict[str, Any]:
    with db_path.open("rb") as f:
        header = f.read(100)
    page_size = struct.unpack(">H", header[16:18])[0]
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        con.execute("PRAGMA query_only=ON")
        query, args = _MESSAGES, tuple[bytes, ...]()
        if conversation is not None:
            query, args = query + " WHERE m.conversation = ?", (conversation,)
        messages = [
            {
                "seq": seq,
                "id": mid.hex(),
                "conversation": b58encode(conv),
                "direction": direction,
                "from": b58encode(sender),
                "text": text,
                "ts": sent_at,
                "stored_at": stored_at,
                "status": status,
                "stored_status": stored_status,
                "is_request": is_request,
            }
            for seq, mid, conv, direction, sender, text, sent_at, stored_at, status, stored_status, is_request in (
                con.execute(query + " ORDER BY m.sent_at, m.seq", args)
            )
        ]
        return {
            "application_id": con.execute("PRAGMA application_id").fetchone()[0],
            "user_version": con.execute("PRAGMA user_version").fetchone()[0],
            "page_size": 65536 if page_size == 1 else page_size,
            "tables": {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")},
            "messages": messages,
            "contacts": [
                {"peer_id": b58encode(p), "name": n, "state": s}
                for p, n, s in con.execute("SELECT peer_id, name, state FROM contacts")
            ],
        }
    finally:
        con.close()
