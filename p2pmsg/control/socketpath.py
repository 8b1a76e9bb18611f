"""Where the control socket lives, and whether a node answers on it (plain ``socket``; shared by server and client)."""

from __future__ import annotations

import enum
import os
import shlex
import socket
import stat
from pathlib import Path
from typing import Final

from p2pmsg.control.errors import ControlSetupError

__all__ = [
    "MAX_SOCKET_PATH",
    "SOCKET_NAME",
    "SocketState",
    "control_socket_path",
    "probe_socket",
    "start_hint",
]

SOCKET_NAME: Final = "control.sock"
#: ``sun_path`` holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH: Final = 107


class SocketState(enum.Enum):
    """What :func:`probe_socket` found at the socket path."""

    ABSENT = "absent"  # nothing there
    STALE = "stale"  # a socket file nobody listens on (a node died without cleaning up)
    RUNNING = "running"  # a node accepted the connection


def control_socket_path(home: str | os.PathLike[str]) -> Path:
    """``<home>/control.sock``; :class:`ControlSetupError` if the path is too long for a Unix socket."""
    path = Path(home) / SOCKET_NAME
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ControlSetupError(
            f"control socket path {path} is {size} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket allows; "
            "use a shorter --home"
        )
    return path


def start_hint(home: str | os.PathLike[str]) -> str:
    """The command that starts a node on ``home`` (for error messages)."""
    return f"p2pmsg --home {shlex.quote(str(home))} run"


def probe_socket(path: str | os.PathLike[str], *, timeout: float = 2.0) -> SocketState:
    """Find out whether a node listens on the socket at ``path``.

    Raises :class:`ControlSetupError` when something other than a socket is in the way, or when connecting fails for
    a reason other than "nobody listens" (permissions, for instance).
    """
    path = Path(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return SocketState.ABSENT
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSetupError(f"{path} exists and is not a socket; move it away so the control socket can be made")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
    except ConnectionRefusedError:
        return SocketState.STALE
    except FileNotFoundError:
        return SocketState.ABSENT  # removed between lstat and connect
    except TimeoutError:
        # A node so busy that its backlog is full is still a node.
        return SocketState.RUNNING
    except OSError as exc:
        raise ControlSetupError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    return SocketState.RUNNING
