"""The ``p2pmsg`` command line.

Theory of operation
-------------------
Every command works on one *home* directory (``--home``, ``$P2PMSG_HOME``, or the platform's user data directory):
``<home>/identity.key`` (the encrypted Ed25519 key), ``<home>/config.toml`` (see :mod:`p2pmsg.cli.config`) and,
while a node runs, ``<home>/control.sock``.

* ``init`` and ``run`` work on the files directly: ``init`` creates the home (0700), the key file and the config;
  ``run`` loads them and runs the node in the foreground (``p2pmsg.node.run_node``).
* Every other command is a client of the running node's control API (:class:`~p2pmsg.control.ControlClient`); the
  CLI never opens the node's database or key while it runs.  Read commands take ``--json`` for machine output.

Errors are shown as one ``error: ...`` line saying what to do, never a traceback.  Exit status: 0 success, 1 error,
2 usage error, 3 no node is running on the home.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import logging
import os
import select
import shlex
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click
import platformdirs

from p2pmsg import __version__
from p2pmsg.cli.config import (
    ACCEPT_FROM_CHOICES,
    CONFIG_FILENAME,
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    load_config,
    write_config,
)
from p2pmsg.cli.output import clean, format_duration, format_ts, render_qr, table, to_json, truncate
from p2pmsg.control import (
    SOCKET_NAME,
    ControlClient,
    ControlError,
    ControlProtocolError,
    ControlRequestError,
    ControlSetupError,
    NodeAlreadyRunningError,
    NodeNotRunningError,
    SocketState,
    control_socket_path,
    probe_socket,
)
from p2pmsg.errors import P2PMsgError
from p2pmsg.identity import (
    Identity,
    KeyFileError,
    PassphraseFileError,
    PassphraseRequiredError,
    UnencryptedKeyFileError,
    WrongPassphraseError,
    load_identity,
    passphrase_from_environment,
    resolve_passphrase,
    save_identity,
)
from p2pmsg.wire.multiaddr import Multiaddr, MultiaddrError

__all__ = [
    "EXIT_ERROR",
    "EXIT_NOT_RUNNING",
    "IDENTITY_FILENAME",
    "CliError",
    "State",
    "cli",
    "default_home",
    "format_message",
    "human_error",
    "main",
]

IDENTITY_FILENAME: Final = "identity.key"
HOME_ENV: Final = "P2PMSG_HOME"
EXIT_ERROR: Final = 1
EXIT_NOT_RUNNING: Final = 3

#: How each control error code is introduced to a human.
_CODE_TEXT: Final = {
    "unknown_contact": "unknown contact",
    "invalid_invite": "malformed invite",
    "name_taken": "name already taken",
    "bad_request": "refused",  # the node's reason follows in words (a contact that exists, a text too long)
    "not_stored": "not stored",
    "internal": "the node failed",
}
_CODE_HINT: Final = {
    "unknown_contact": "see `p2pmsg contacts list`",
    "invalid_invite": "an invite looks like p2pmsg://invite/12D3KooW...; a bare peer id works too",
    "not_stored": (
        "the node's database could not be written or read: is its disk full, or the file gone or damaged? see "
        "`p2pmsg status` and the node's log"
    ),
}
#: A hint of its own for an error code of one method.
_METHOD_HINT: Final = {
    ("requests.accept", "unknown_contact"): "see `p2pmsg requests`",
    ("contacts.add", "bad_request"): (
        "see `p2pmsg contacts list`; `p2pmsg contacts rename` changes a contact's name, `contacts unblock` unblocks it"
    ),
}
#: How the node's refusal of a peer that is already a contact starts (``repo.add_contact``).
_CONTACT_EXISTS: Final = "this peer is already the contact "
#: Words of their own for an error code of one method (the node answers a missing request as ``unknown_contact``).
_METHOD_TEXT: Final = {
    ("requests.accept", "unknown_contact"): "unknown request",
}


def _request_error(exc: ControlRequestError, method: str | None = None) -> CliError:
    """The error the node answered, introduced by its code, with the hint for that code (and method)."""
    words = _METHOD_TEXT.get((method or "", exc.code)) or _CODE_TEXT.get(exc.code, exc.code)
    message = exc.message.removeprefix("invalid invite: ") if exc.code == "invalid_invite" else exc.message
    text = f"{words}: {clean(message)}"
    hint = _METHOD_HINT.get((method or "", exc.code)) or _CODE_HINT.get(exc.code)
    if (method, exc.code) == ("contacts.add", "bad_request") and not exc.message.startswith(_CONTACT_EXISTS):
        hint = None  # the rename/unblock hint is for a peer added twice, not for a name or an invite refused
    return CliError(f"{text} ({hint})" if hint else text)


def default_home() -> Path:
    """The home used without ``--home`` or ``$P2PMSG_HOME``: the platform's user data directory for p2pmsg."""
    return Path(platformdirs.user_data_dir("p2pmsg", appauthor=False))


class CliError(click.ClickException):
    """An error shown as ``error: <message>``, exit status 1."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class NotRunningCliError(CliError):
    """No node runs on the home: exit status 3, so scripts can tell it apart."""

    exit_code = EXIT_NOT_RUNNING


def _unwrap(exc: BaseException) -> BaseException:
    """The single error inside (nested) exception groups, as trio nurseries raise them."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def human_error(exc: BaseException, *, home: Path) -> CliError | None:
    """The :class:`CliError` a human should see for ``exc``, or ``None`` if it is not one of ours."""
    exc = _unwrap(exc)
    quoted = shlex.quote(str(home))
    if isinstance(exc, NodeNotRunningError):
        return NotRunningCliError(str(exc))
    if isinstance(exc, NodeAlreadyRunningError):
        return CliError(str(exc))
    if isinstance(exc, ControlRequestError):
        return _request_error(exc)
    if isinstance(exc, ControlProtocolError):
        return CliError(f"the node sent something this p2pmsg does not understand ({exc}); are both the same version?")
    if isinstance(exc, WrongPassphraseError):
        return CliError(f"wrong passphrase for {home / IDENTITY_FILENAME}")
    if isinstance(exc, PassphraseFileError):  # the source was given and is unusable: it is never passed over
        return CliError(str(exc))
    if isinstance(exc, PassphraseRequiredError):
        return CliError(
            f"{exc} (set $P2PMSG_PASSPHRASE or $P2PMSG_PASSPHRASE_FILE, give the systemd credential "
            "p2pmsg-passphrase, or run in a terminal)"
        )
    if isinstance(exc, UnencryptedKeyFileError):
        return CliError(
            f"{home / IDENTITY_FILENAME} is not encrypted, so it is only loaded on request: if you made it with "
            f"`p2pmsg init --no-passphrase`, start with `p2pmsg --home {quoted} run --no-passphrase`; otherwise "
            "someone else may have put it there"
        )
    if isinstance(exc, KeyFileError):
        return CliError(f"{exc}")
    if isinstance(exc, ConfigError):
        return CliError(
            f"{exc} (fix {home / CONFIG_FILENAME}, or recreate the home with `p2pmsg --home {quoted} init`)"
        )
    if isinstance(exc, ControlError | P2PMsgError):
        return CliError(str(exc))
    if isinstance(exc, OSError) and exc.strerror:
        # The file system said no (permission denied, a file where a directory should be...).
        where = f"{exc.filename}: " if exc.filename else ""
        return CliError(f"{where}{exc.strerror}")
    return None


class _Group(click.Group):
    """The root group: turns p2pmsg's exceptions into one-line human errors."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except BrokenPipeError:
            if not _stdout_gone():
                raise
            # Whoever read our output stopped (`p2pmsg history NAME | head`): end quietly, as other command-line
            # tools do, with stdout on /dev/null so that the interpreter's last flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(1)
        except (Exception, BaseExceptionGroup) as exc:
            state = ctx.find_object(State)
            error = human_error(exc, home=state.home if state else default_home())
            if error is None:
                raise
            raise error from None


def _stdout_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end was closed."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a real file
        return False


class State:
    """What every command shares: the home, and a control client opened on first use."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._client: ControlClient | None = None

    @property
    def client(self) -> ControlClient:
        """The control client of the node running on :attr:`home`."""
        if self._client is None:
            self._client = ControlClient(self.home)
        return self._client

    def call(self, method: str, /, **params: Any) -> Any:
        """Call a control method of the running node; an error it answers becomes a :class:`CliError`."""
        try:
            return self.client.call(method, **params)
        except ControlRequestError as exc:
            raise _request_error(exc, method) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


pass_state = click.make_pass_decorator(State)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json`` (the command's result as JSON on stdout)."""
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def _echo_json(value: Any) -> None:
    click.echo(to_json(value))


def _rows(result: Any, what: str) -> list[dict[str, Any]]:
    """A list-of-maps result, refusing anything else with a clear error."""
    if not isinstance(result, list) or not all(isinstance(row, dict) for row in result):
        raise CliError(f"the node answered {what} with something other than a list of records")
    return result


def _record(result: Any, what: str) -> dict[str, Any]:
    if not isinstance(result, dict):
        raise CliError(f"the node answered {what} with something other than a record")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Root


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2pmsg")
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar=HOME_ENV,
    show_envvar=True,
    default=None,
    help="The node's home directory (key, config, control socket).  [default: the user data dir, "
    "e.g. ~/.local/share/p2pmsg]",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """p2pmsg: a serverless, end-to-end encrypted messenger.

    Start with `p2pmsg init`, keep `p2pmsg run` going, and use the other commands (in another terminal) to talk to
    the running node.
    """
    if home == "":  # a variable that was not set (``--home "$DIR"``): not the current directory
        raise click.BadParameter("is empty; name the node's directory", param_hint="--home")
    state = State(Path(home) if home is not None else default_home())
    ctx.obj = state
    ctx.call_on_close(state.close)


# ---------------------------------------------------------------------------------------------------------------------
# init / run: the files, not the control API


@cli.command()
@click.option("--no-passphrase", is_flag=True, help="Store the key unencrypted (anyone who reads it can be you).")
@click.option(
    "--listen", multiple=True, metavar="MULTIADDR", help=f"Listen address (repeatable). [default: {DEFAULT_LISTEN[0]}]"
)
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR", help="Address of a node to join through (repeatable).")
@click.option("--accept-from", type=click.Choice(ACCEPT_FROM_CHOICES), default="contacts", show_default=True,
              help="Whose messages are accepted; strangers' wait in `p2pmsg requests` with 'contacts'.")  # fmt: skip
@click.option("--dht-port", type=click.IntRange(0, 65535), default=None, help="UDP port of the DHT.")
@pass_state
def init(
    state: State,
    no_passphrase: bool,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    accept_from: str,
    dht_port: int | None,
) -> None:
    """Create a home: a new identity (encrypted key file) and config.toml.

    The passphrase is read from $P2PMSG_PASSPHRASE or the file named by $P2PMSG_PASSPHRASE_FILE if set, else asked
    twice.  An existing identity is never overwritten; if the home has one but lost its config.toml, only a new
    config.toml is written (from the options given).
    """
    home = state.home
    key_path = home / IDENTITY_FILENAME
    config_path = home / CONFIG_FILENAME
    if key_path.exists() and (config_path.exists() or config_path.is_symlink()):
        raise CliError(
            f"{home} already has an identity ({key_path}); refusing to overwrite it. "
            "Use another --home for a second identity."
        )
    try:
        config = Config(
            listen=list(listen) or list(DEFAULT_LISTEN),
            bootstrap=list(bootstrap),
            accept_from=accept_from,
            dht_port=dht_port,
        )
    except ConfigError as exc:  # an option's value: nothing was written yet
        raise CliError(f"{exc} (check --listen and --bootstrap; nothing was created)") from None
    if key_path.exists():  # the config went missing: what `run` told the user to do about it
        write_config(config_path, config)
        click.echo(f"{home} already has an identity ({key_path}): kept it, and wrote the missing {config_path}")
        return
    try:  # a home too deep for the node's control socket could never run: say so before making it
        control_socket_path(home)
    except ControlSetupError as exc:
        raise CliError(f"{exc}; nothing was created") from None
    _check_home_is_ours(home)  # before the passphrase is asked
    passphrase = None if no_passphrase else resolve_passphrase(confirm=True, prompt=_prompt)
    if passphrase == "":
        raise CliError(
            "the passphrase is empty: give one, or run `init --no-passphrase` for a key file without a passphrase "
            "(anyone who can read it then has your identity)"
        )
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode != 0o700:
        os.chmod(home, 0o700)
        click.echo(f"made {home} private (mode 0700; it was 0{mode:o})")
    identity = Identity.generate()
    save_identity(key_path, identity, passphrase, allow_unencrypted=no_passphrase)
    if config_path.exists():
        click.echo(f"kept the existing {config_path}")
    else:
        write_config(config_path, config)
    _create_database(home)
    click.echo(f"created {key_path}" + (" (UNENCRYPTED)" if no_passphrase else ""))
    click.echo(f"peer id  {identity.peer_id}")
    click.echo(f"start the node with: p2pmsg --home {shlex.quote(str(home))} run")


def _check_home_is_ours(home: Path) -> None:
    """Refuse a home that already holds files other than a node's: ``init`` makes the home private (mode 0700) and
    keeps a private key in it, so ``--home /tmp`` (or an empty ``--home "$UNSET"``: the current directory) must not
    lock everyone else out of a shared directory."""
    if not home.is_dir():
        return
    ours = (SOCKET_NAME,)
    # The database, config.toml and its backups (config.toml~, config.toml.bak), temporary files.
    own_prefixes = ("p2pmsg.db", CONFIG_FILENAME, f".{IDENTITY_FILENAME}.", f".{CONFIG_FILENAME}.")
    try:
        foreign = sorted(p.name for p in home.iterdir() if p.name not in ours and not p.name.startswith(own_prefixes))
    except OSError as exc:
        raise CliError(f"cannot read {home}: {exc.strerror or exc}") from None
    # Hidden files are the rule in a service user's home (useradd copies /etc/skel: .bashrc, .profile): they may
    # stay, unless others may write to the directory (/tmp and its like).
    shared = bool(home.stat().st_mode & stat.S_IWOTH)
    foreign = [name for name in foreign if shared or not name.startswith(".")]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise CliError(
            f"{home} already holds other files ({shown}); a node's home keeps its private key and is made private "
            "(mode 0700), so give init a new or empty directory (it is created); nothing was changed"
        )


def _create_database(home: Path) -> None:
    """Create the node's database with its schema (or migrate one already there), so that ``run`` can tell a home
    whose database went missing from a new one."""
    import trio  # only init and run need it: other commands start without it

    from p2pmsg.store.db import DATABASE_FILENAME, open_database

    async def create() -> None:
        async with open_database(home / DATABASE_FILENAME):
            pass

    trio.run(create)


def _interactive() -> bool:
    """Whether stdin is a terminal (a person types, so a passphrase can be asked without echo, and asked again)."""
    return sys.stdin.isatty()


def _prompt(text: str) -> str:
    """Ask for a passphrase without echo (through click, so the prompt goes where click's output goes)."""
    if not _interactive():  # piped: read a line as getpass would, without its "can not control echo" warning
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.removesuffix("\n")
    try:
        value: str = click.prompt(
            text.removesuffix(": "), hide_input=True, default="", show_default=False, prompt_suffix=": "
        )
    except click.Abort:
        raise EOFError from None
    return value


def _load_identity(key_path: Path, *, no_passphrase: bool) -> Identity:
    """Load the key file: unencrypted only if the user says so (``--no-passphrase`` or an empty
    ``$P2PMSG_PASSPHRASE``: intent from outside the home, where a planted key file could not supply it); encrypted
    with the passphrase from the environment (read once: a passphrase file may be a pipe) or the prompt."""
    supplied = passphrase_from_environment()
    try:
        return load_identity(key_path, None, allow_unencrypted=no_passphrase or supplied == "")
    except PassphraseRequiredError:
        if no_passphrase:
            raise CliError(
                f"{key_path} is encrypted: start without --no-passphrase and give its passphrase (prompt, "
                "$P2PMSG_PASSPHRASE or $P2PMSG_PASSPHRASE_FILE)"
            ) from None
        if supplied == "":
            raise CliError(
                f"{key_path} is encrypted, but $P2PMSG_PASSPHRASE is set and empty (which says the key is not): "
                "unset it, or set it to the passphrase"
            ) from None
        if supplied is not None:
            return load_identity(key_path, supplied)
    tries = _PASSPHRASE_TRIES if _interactive() else 1
    for attempt in range(1, tries + 1):
        try:
            return load_identity(key_path, resolve_passphrase(prompt=_prompt))
        except WrongPassphraseError:
            if attempt == tries:
                raise
            click.echo("wrong passphrase, try again", err=True)
    raise AssertionError("unreachable")  # pragma: no cover


_PASSPHRASE_TRIES: Final = 3
"""Passphrases asked at a terminal before giving up (each try costs an Argon2id derivation, ~1 s on a Pi)."""


_NO_PASSPHRASE_HELP: Final = (
    'The key file was made with `init --no-passphrase` (P2PMSG_PASSPHRASE="" also allows an unencrypted file).'
)


@cli.command()
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="How much the node logs (to stderr).",
)
@click.option("--no-passphrase", is_flag=True, help=_NO_PASSPHRASE_HELP)
@pass_state
def run(state: State, log_level: str, no_passphrase: bool) -> None:
    """Run the node in the foreground until Ctrl-C."""
    home = state.home
    key_path = home / IDENTITY_FILENAME
    if not key_path.exists():
        raise CliError(f"no identity in {home}; create one with `p2pmsg --home {shlex.quote(str(home))} init`")
    config = load_config(home / CONFIG_FILENAME)
    # Refuse early, before asking for the passphrase, if a node already runs here (the node checks again).
    if probe_socket(control_socket_path(home)) is SocketState.RUNNING:
        raise NodeAlreadyRunningError(f"another node is already running on {home}; stop it first or use another --home")
    identity = _load_identity(key_path, no_passphrase=no_passphrase)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # Imported here, not at the top: the CLI's other commands do not need the node's code.
        run_node: Any = importlib.import_module("p2pmsg.node").run_node
    except (ImportError, AttributeError) as exc:
        raise CliError(f"this installation has no node yet ({exc})") from None
    click.echo(f"node {identity.peer_id} starting on {home} (Ctrl-C to stop)", err=True)
    try:
        if inspect.iscoroutinefunction(run_node):
            import trio

            trio.run(run_node, home, identity, config)
        else:
            run_node(home, identity, config)
    except KeyboardInterrupt:
        click.echo("node stopped", err=True)


@cli.command("bootstrap")
@click.option(
    "--listen",
    default="/ip4/0.0.0.0/udp/4001",
    show_default=True,
    metavar="MULTIADDR",
    help="UDP address of the DHT.",
)
@click.option("--bootstrap", "peers", multiple=True, metavar="MULTIADDR", help="Other nodes to join (repeatable).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="How much the node logs (to stderr).",
)
@pass_state
def bootstrap_command(state: State, listen: str, peers: tuple[str, ...], log_level: str) -> None:
    """Run a DHT-only bootstrap node (no chat, no database) until Ctrl-C.

    It prints its full multiaddr (with /p2p/...) for other nodes' --bootstrap.  It uses the home's identity.key
    (encrypted or not), creating an unencrypted one on first use: a bootstrap node's key only names it in the DHT.
    Run `p2pmsg init` first to have it encrypted.
    """
    home = state.home
    try:
        listen_addr = Multiaddr.parse(listen)
        kind = listen_addr.transport()[0]
        for peer in peers:
            Multiaddr.parse(peer).transport()
    except MultiaddrError as exc:
        raise CliError(f"not a usable multiaddr: {exc}") from None
    if kind != "udp" or listen_addr.peer_id is not None:
        raise CliError(f"--listen {listen}: a bootstrap node listens on UDP, like /ip4/0.0.0.0/udp/4001")
    key_path = home / IDENTITY_FILENAME
    if key_path.exists():
        try:  # a clear key (made here) is the usual case; one from `p2pmsg init` needs its passphrase
            identity = load_identity(key_path, None, allow_unencrypted=True)
        except PassphraseRequiredError:
            identity = _load_identity(key_path, no_passphrase=False)
    else:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = Identity.generate()
        save_identity(key_path, identity, None, allow_unencrypted=True)
        click.echo(f"created {key_path} (unencrypted)", err=True)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_bootstrap_node: Any = importlib.import_module("p2pmsg.node").run_bootstrap_node
    except (ImportError, AttributeError) as exc:
        raise CliError(f"this installation has no bootstrap node ({exc})") from None

    def ready(addr: object) -> None:
        click.echo(f"bootstrap node listening on {addr}")

    import trio

    try:
        trio.run(functools.partial(run_bootstrap_node, identity, listen_addr, bootstrap=list(peers), on_ready=ready))
    except KeyboardInterrupt:
        click.echo("bootstrap node stopped", err=True)


# ---------------------------------------------------------------------------------------------------------------------
# Identity


@cli.command("id")
@json_option
@click.option("--no-qr", is_flag=True, help="Do not draw the invite as a QR code.")
@click.option("--no-passphrase", is_flag=True, help="When no node runs: " + _NO_PASSPHRASE_HELP)
@pass_state
def id_(state: State, as_json: bool, no_qr: bool, no_passphrase: bool) -> None:
    """Show this node's peer id, addresses and invite link (with a QR code on a terminal).

    When no node runs on the home, they come from the key file (its passphrase is asked for) and config.toml: the
    addresses the node will advertise once it runs, as far as they are known before it starts."""
    try:
        info = _record(state.call("id"), "id")
        info["running"] = True
    except NodeNotRunningError:
        info = _offline_id(state.home, no_passphrase=no_passphrase)
    if as_json:
        _echo_json(info)
        return
    addrs = info.get("addrs") or []
    invite = str(info.get("invite", ""))
    if not info["running"]:
        click.echo(
            f"(no node runs on {state.home}: these come from its key file and config.toml; start it with `p2pmsg run`)",
            err=True,
        )
    click.echo(f"peer id  {clean(info.get('peer_id', '-'))}")
    for index, addr in enumerate(addrs if isinstance(addrs, list) else []):
        click.echo(f"{'address' if index == 0 else '':7}  {clean(addr)}")
    if not addrs:
        click.echo(
            "address  (none yet)" if info["running"] else "address  (known once the node runs: it listens on port 0)"
        )
    click.echo(f"invite   {clean(invite)}")
    if invite and not no_qr and sys.stdout.isatty():
        click.echo(render_qr(invite))


def _offline_id(home: Path, *, no_passphrase: bool) -> dict[str, Any]:
    """``id`` without a running node: the identity from the key file, the addresses from config.toml."""
    key_path = home / IDENTITY_FILENAME
    if not key_path.exists():
        raise NotRunningCliError(
            f"no node runs on {home} and it has no identity yet; create one with "
            f"`p2pmsg --home {shlex.quote(str(home))} init`"
        )
    config = load_config(home / CONFIG_FILENAME)
    identity = _load_identity(key_path, no_passphrase=no_passphrase)
    node: Any = importlib.import_module("p2pmsg.node")
    try:
        addrs = node.configured_addrs(config)
    except MultiaddrError as exc:
        raise CliError(f"{home / CONFIG_FILENAME}: listen: {exc}") from None
    info: dict[str, Any] = node.id_info(identity, addrs)
    info["running"] = False
    return info


# ---------------------------------------------------------------------------------------------------------------------
# Contacts


@cli.group()
def contacts() -> None:
    """Manage contacts: add, list, rename, remove, block, unblock."""


if TYPE_CHECKING:
    _StrParamType = click.ParamType[str]
else:  # generic only in the typing of recent click versions (pyproject allows click >= 8.1)
    _StrParamType = click.ParamType


class _NameType(_StrParamType):
    """A contact name (or peer id) as typed: not empty, and text (a byte that is not UTF-8, from a shell variable or a
    file, reaches Python as a lone surrogate, which the node's control API refuses in its own words)."""

    name = "name"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text:
            self.fail("is empty", param, ctx)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.fail("holds bytes that are not UTF-8 text", param, ctx)
        return text


NAME_TYPE: Final = _NameType()


def _one_name(name: str | None, name_option: str | None, usage: str) -> str:
    """The contact name given as the NAME argument or as --name (the same one if both)."""
    if name is not None and name_option is not None and name != name_option:
        raise click.UsageError(f"two different names given: {name!r} and --name {name_option!r}")
    chosen = name if name is not None else name_option
    if not chosen:
        raise click.UsageError(f"give the contact a name: {usage}")
    return chosen


@contacts.command("add")
@click.argument("target")
@click.argument("name", type=NAME_TYPE, required=False)
@click.option(
    "--name", "name_option", type=NAME_TYPE, metavar="NAME", help="The contact's name (instead of the NAME argument)."
)
@pass_state
def contacts_add(state: State, target: str, name: str | None, name_option: str | None) -> None:
    """Add a contact from an invite link (or a bare peer id) under NAME (or --name NAME)."""
    name = _one_name(name, name_option, "p2pmsg contacts add INVITE NAME")
    result = _record(state.call("contacts.add", target=target, name=name), "contacts.add")
    click.echo(f"added {clean(result.get('name', name))} ({clean(result.get('peer_id', '?'))})")
    if result.get("unblocked"):
        click.echo("it was blocked: it is no longer")
    ignored = _ignored_invite_parameters(target)
    if ignored:
        names = ", ".join(repr(truncate(clean(n), 32)) for n in ignored[:4]) + (", ..." if len(ignored) > 4 else "")
        click.echo(
            f"note: the invite's parameter(s) {names} are unknown to this version and were ignored (mistyped? the "
            "address hints are addr=...)",
            err=True,
        )


def _ignored_invite_parameters(target: str) -> tuple[str, ...]:
    """Names of the query parameters of the invite ``target`` that this version ignores (none for a peer id)."""
    from p2pmsg.chat.invite import parse_target  # only here: other commands need no invite parsing

    try:
        return parse_target(target).ignored
    except P2PMsgError:  # the node took it; a parser that disagrees has nothing to add
        return ()


@contacts.command("list")
@json_option
@pass_state
def contacts_list(state: State, as_json: bool) -> None:
    """List contacts (and blocked peers)."""
    rows = _rows(state.call("contacts.list"), "contacts.list")
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no contacts yet (add one with `p2pmsg contacts add INVITE NAME`)")
        return
    click.echo(
        table(
            ["NAME", "STATE", "ADDED", "PEER ID"],
            [[r.get("name") or "-", r.get("state", ""), format_ts(r.get("added")), r.get("peer_id", "")] for r in rows],
        )
    )


@contacts.command("rename")
@click.argument("name", type=NAME_TYPE)
@click.argument("new_name", type=NAME_TYPE)
@pass_state
def contacts_rename(state: State, name: str, new_name: str) -> None:
    """Rename the contact NAME to NEW_NAME."""
    if not new_name.strip():
        raise click.UsageError("NEW_NAME must not be empty")
    state.call("contacts.rename", name=name, new_name=new_name)
    click.echo(f"renamed {clean(name)} to {clean(new_name)}")


@contacts.command("remove")
@click.argument("name", type=NAME_TYPE)
@pass_state
def contacts_remove(state: State, name: str) -> None:
    """Remove the contact NAME (its history stays; a blocked contact stays blocked)."""
    result = _record(state.call("contacts.remove", name=name), "contacts.remove")
    click.echo(f"removed {clean(name)}")
    peer = clean(result.get("peer_id", "?"))
    if result.get("blocked"):
        click.echo(f"it stays blocked: `p2pmsg contacts unblock {peer}` lets it write to you again")
    queued = result.get("queued")
    if isinstance(queued, int) and queued > 0:
        when = "wait while it is blocked" if result.get("blocked") else "are delivered when it is reachable"
        click.echo(f"{queued} message(s) to it are still queued: they {when}")


@contacts.command("block")
@click.argument("name_or_peer", type=NAME_TYPE)
@pass_state
def contacts_block(state: State, name_or_peer: str) -> None:
    """Block a contact (by name) or any peer (by peer id)."""
    state.call("contacts.block", name_or_peer=name_or_peer)
    click.echo(f"blocked {clean(name_or_peer)}")


@contacts.command("unblock")
@click.argument("name_or_peer", type=NAME_TYPE)
@pass_state
def contacts_unblock(state: State, name_or_peer: str) -> None:
    """Unblock a contact or peer."""
    state.call("contacts.unblock", name_or_peer=name_or_peer)
    click.echo(f"unblocked {clean(name_or_peer)}")


# ---------------------------------------------------------------------------------------------------------------------
# Messages


@cli.command()
@click.argument("name", type=NAME_TYPE)
@click.argument("text", nargs=-1)
@json_option
@pass_state
def send(state: State, name: str, text: tuple[str, ...], as_json: bool) -> None:
    """Send TEXT to the contact NAME (the words are joined by spaces; no TEXT: read the message from stdin).

    Returns once the message is safely queued; it is delivered when the contact is reachable.
    """
    # Bytes that are not UTF-8 become lone surrogates (as in arguments), refused below with a plain answer.
    message = " ".join(text) if text else _read_stdin_message()
    if not message.strip():
        raise click.UsageError("nothing to send: give TEXT or pipe the message on stdin (not only white space)")
    if len(message) > _MAX_CHARS_SURELY_SHORT or not message.isascii():
        from p2pmsg.cli.chatloop import text_problem  # here: a short ASCII send skips the import

        if (problem := text_problem(message)) is not None:
            raise CliError(f"the message {problem}")
    result = _record(state.call("send", name=name, text=message), "send")
    if as_json:
        _echo_json(result)
        return
    click.echo(f"{clean(result.get('status', 'queued'))} {clean(result.get('id', ''))}")


def _read_stdin_message() -> str:
    """The message piped on stdin, without its trailing newlines.  Reads at most two bytes more than a message may
    hold, so ``send NAME < /dev/zero`` or a wrong file says it is too long instead of filling memory."""
    from p2pmsg.chat.envelope import MAX_TEXT_BYTES  # here: a send with TEXT skips the import

    data = sys.stdin.buffer.read(MAX_TEXT_BYTES + 2)
    if len(data) > MAX_TEXT_BYTES + 1:
        raise CliError(f"the message on stdin is longer than the limit of {MAX_TEXT_BYTES} bytes (64 KiB)")
    return data.decode("utf-8", "surrogateescape").rstrip("\n")


_MAX_CHARS_SURELY_SHORT: Final = 16 * 1024
"""A text of at most this many characters is within the 64 KiB limit whatever they are (UTF-8: <= 4 bytes each)."""

_LIMIT_RANGE: Final = click.IntRange(1, (1 << 31) - 1)
_HISTORY_PAGE: Final = 10_000
"""Messages asked of the node per ``history`` call (its most per reply; it may give fewer, for its 8 MiB of text)."""
"""--limit values the node accepts (it serves at most 10,000 rows whatever the limit)."""


def format_message(row: dict[str, Any], *, contact: str) -> str:
    """One history line: ``[time] who: text`` (+ the status of an outgoing message not yet delivered)."""
    outgoing = row.get("direction") == "out"
    who = "me" if outgoing else contact
    status = row.get("status")
    suffix = f"  ({clean(status)})" if outgoing and status not in (None, "delivered", "read") else ""
    return f"[{format_ts(row.get('ts'))}] {clean(who)}: {clean(row.get('text', ''), multiline=True)}{suffix}"


@cli.command()
@click.argument("name", type=NAME_TYPE)
@click.option("--limit", type=_LIMIT_RANGE, default=50, show_default=True, help="How many messages.")
@click.option(
    "--before", type=click.IntRange(0, (1 << 63) - 1), default=None, help="Only messages before this time (ms)."
)
@click.option(
    "--before-seq",
    type=click.IntRange(0, (1 << 63) - 1),
    default=None,
    help="With --before: only messages before the one with this ts and seq (page back from the first row of --json).",
)
@json_option
@pass_state
def history(state: State, name: str, limit: int, before: int | None, before_seq: int | None, as_json: bool) -> None:
    """Show the conversation with NAME, oldest first."""
    if before_seq is not None and before is None:
        raise click.UsageError("--before-seq needs --before (the ts of the same message)")
    rows = _page_back(state, name, limit, before, before_seq)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"no messages with {clean(name)} yet")
    for row in rows:
        click.echo(format_message(row, contact=name))


def _page_back(
    state: State, name: str, limit: int | None, before: int | None = None, before_seq: int | None = None
) -> list[dict[str, Any]]:
    """Up to ``limit`` (``None``: all) messages with ``name`` before the position ``(before, before_seq)``, oldest
    first, fetched page by page: one reply holds at most 10,000 messages and 8 MiB of text."""
    rows: list[dict[str, Any]] = []
    while limit is None or len(rows) < limit:
        ask = _HISTORY_PAGE if limit is None else min(limit - len(rows), _HISTORY_PAGE)
        params: dict[str, Any] = {"name": name, "limit": ask}
        if before is not None:
            params["before"] = before
        if before_seq is not None:
            params["before_seq"] = before_seq
        page = _rows(state.call("history", **params), "history")
        if not page:
            break
        rows[:0] = page
        before, before_seq = _cursor(page[0])
    return rows


def _cursor(row: dict[str, Any]) -> tuple[int, int]:
    """The ``(before, before_seq)`` that pages back from ``row``."""
    ts, seq = row.get("ts"), row.get("seq")
    if type(ts) is not int or type(seq) is not int:
        raise CliError("the node answered history rows without an integer ts and seq")
    return ts, seq


@cli.command()
@click.argument("name", type=NAME_TYPE)
@click.option("--limit", type=_LIMIT_RANGE, default=20, show_default=True, help="History shown first.")
@pass_state
def chat(state: State, name: str, limit: int) -> None:
    """Chat with NAME: show recent history and incoming messages; each line typed (or piped) is sent.

    Leave with Ctrl-D (end of input); with piped input it exits once every line is queued.
    """
    from p2pmsg.cli.chatloop import run_chat

    stdin = sys.stdin
    if isinstance(stdin, io.TextIOWrapper):  # a byte that is not UTF-8 must be refused (by line), not end the chat
        stdin.reconfigure(errors="surrogateescape")
    outcome = run_chat(
        state.client,
        name,
        limit=limit,
        stdin=stdin,
        echo=click.echo,
        format_line=format_message,
    )
    if outcome.refused:
        raise CliError(f"{outcome.refused} line(s) not sent (see the refused lines above); the others were queued")


@cli.command()
@json_option
@pass_state
def inbox(state: State, as_json: bool) -> None:
    """List conversations, most recent first."""
    rows = _rows(state.call("inbox"), "inbox")
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no conversations yet")
        return
    click.echo(
        table(
            ["NAME", "LAST", "MESSAGE"],
            [
                [
                    r.get("name", ""),
                    format_ts(r.get("last_ts")),
                    truncate(("me: " if r.get("last_direction") == "out" else "") + str(r.get("last_text", "")), 60),
                ]
                for r in rows
            ],
        )
    )


@cli.group(invoke_without_command=True)
@json_option
@click.pass_context
def requests(ctx: click.Context, as_json: bool) -> None:
    """List message requests from strangers; accept or block them."""
    if ctx.invoked_subcommand is not None:
        return
    state = ctx.find_object(State)
    assert state is not None
    rows = _rows(state.call("requests.list"), "requests.list")
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no message requests")
        return
    click.echo(
        table(
            ["PEER ID", "COUNT", "LAST", "MESSAGE"],
            [
                [
                    r.get("peer_id", ""),
                    r.get("count", ""),
                    format_ts(r.get("last_ts")),
                    truncate(str(r.get("last_text", "")), 50),
                ]
                for r in rows
            ],
        )
    )
    click.echo(
        "read one with `p2pmsg history PEER_ID`; then `p2pmsg requests accept PEER_ID NAME` or "
        "`p2pmsg requests block PEER_ID`"
    )


@requests.command("accept")
@click.argument("peer_id")
@click.argument("name", type=NAME_TYPE, required=False)
@click.option(
    "--name", "name_option", type=NAME_TYPE, metavar="NAME", help="The contact's name (instead of the NAME argument)."
)
@pass_state
def requests_accept(state: State, peer_id: str, name: str | None, name_option: str | None) -> None:
    """Accept the request from PEER_ID as a contact called NAME (or --name NAME)."""
    name = _one_name(name, name_option, "p2pmsg requests accept PEER_ID NAME")
    result = _record(state.call("requests.accept", peer_id=peer_id, name=name), "requests.accept")
    click.echo(f"accepted {clean(peer_id)} as {clean(result.get('name') or name)}")


@requests.command("block")
@click.argument("peer_id")
@pass_state
def requests_block(state: State, peer_id: str) -> None:
    """Block PEER_ID and drop its requests."""
    state.call("requests.block", peer_id=peer_id)
    click.echo(f"blocked {clean(peer_id)}")


# ---------------------------------------------------------------------------------------------------------------------
# Node state


@cli.command()
@json_option
@pass_state
def peers(state: State, as_json: bool) -> None:
    """List connected peers."""
    rows = _rows(state.call("peers"), "peers")
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no connected peers")
        return
    click.echo(
        table(
            ["NAME", "DIRECTION", "SINCE", "ADDRESS", "PEER ID"],
            [
                [
                    r.get("name") or "-",
                    r.get("direction", ""),
                    format_ts(r.get("since")),
                    r.get("addr", ""),
                    r.get("peer_id", ""),
                ]
                for r in rows
            ],
        )
    )


@cli.command()
@json_option
@pass_state
def status(state: State, as_json: bool) -> None:
    """Show the node's health: uptime, connections, DHT size, outbox depth, dropped inputs."""
    info = _record(state.call("status"), "status")
    if as_json:
        _echo_json(info)
        return
    dropped = info.get("dropped") or {}
    dropped_text = (
        ", ".join(f"{clean(reason)}={clean(count)}" for reason, count in sorted(dropped.items()))
        if isinstance(dropped, dict) and dropped
        else "none"
    )
    lines = [
        ("peer id", info.get("peer_id", "-")),
        ("uptime", format_duration(info.get("uptime_s"))),
        ("connections", info.get("connections", "-")),
        ("dht size", _dht_size_text(info.get("dht_size", "-"))),
        ("outbox depth", info.get("outbox_depth", "-")),
        ("requests", _requests_text(info.get("requests", "-"))),
        ("database", _database_text(info.get("database", "-"), info.get("store_failing"))),
        ("dropped", dropped_text),
    ]
    offset = info.get("clock_offset_s")
    if type(offset) is int and offset:  # shown only when the node judges its clock off
        where = "ahead of" if offset > 0 else "behind"
        lines.insert(-1, ("clock", f"{format_duration(abs(offset))} {where} the other nodes' (set it right: NTP)"))
    for label, value in lines:
        click.echo(f"{label:<13} {value if label == 'dropped' else clean(value)}")


def _database_text(state: object, failing: object) -> str:
    """The database check's result, and whether (since when, why) writes fail: a full disk shows here."""
    if not isinstance(failing, dict):
        return str(state)

    def when(key: str, layout: str) -> str:
        value = failing.get(key)
        return time.strftime(layout, time.localtime(value)) if type(value) is int else "?"

    failed = f"since {when('since', '%Y-%m-%d %H:%M:%S')} (the latest at {when('last', '%H:%M:%S')})"
    if type(failing.get("stored")) is int:  # messages were stored after the latest failure: room came back
        return (
            f"{state}; writes failed {failed}: {failing.get('error', '')}; messages are stored again (the latest at "
            f"{when('stored', '%H:%M:%S')})"
        )
    return (
        f"{state}, but writes fail {failed}: {failing.get('error', '')} (nothing is lost: received messages wait at "
        "their senders, and sends fail)"
    )


def _requests_text(count: object) -> str:
    """The number of pending message requests, with where to read them."""
    return f"{count} (see `p2pmsg requests`)" if isinstance(count, int) and count > 0 else str(count)


def _dht_size_text(size: object) -> str:
    """The DHT size, with what an empty routing table means for the user."""
    if size == 0:
        return "0 (no DHT node answered: check `bootstrap` in config.toml, and that those nodes run)"
    return str(size)


@cli.command()
@click.argument("name", type=NAME_TYPE)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this new file (mode 0600) instead of stdout.",
)
@click.option("--json", "as_json", is_flag=True, help="Accepted like every read command's; the export is always JSON.")
@pass_state
def export(state: State, name: str, output: Path | None, as_json: bool) -> None:
    """Export the contact NAME and the whole conversation as JSON."""
    record = _record(state.call("export", name=name), "export")
    messages = _rows(record.get("messages"), "export")
    if record.pop("more", False) and messages:  # one reply could not hold it all: page back for the rest
        messages[:0] = _page_back(state, name, None, *_cursor(messages[0]))
    record["messages"] = messages
    text = to_json(record) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CliError(f"{output} already exists; choose a new file name") from None
    except OSError as exc:
        raise CliError(f"cannot create {output}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    click.echo(f"exported {clean(name)} to {output}")


def main() -> None:
    """Run the command line (the ``p2pmsg`` console script)."""
    cli(prog_name="p2pmsg")
