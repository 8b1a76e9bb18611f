"""The encrypted key file: round trips, every distinct error, mode 0600, atomic replacement, passphrase input."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path

import nacl.encoding
import nacl.hash
import nacl.pwhash.argon2id
import pytest
from conftest import error_reading_a_named_pipe, load_vectors

from p2pmsg.errors import P2PMsgError
from p2pmsg.identity import (
    MAX_MEMLIMIT,
    MAX_OPSLIMIT,
    PASSPHRASE_CREDENTIAL,
    PASSPHRASE_ENV,
    PASSPHRASE_FILE_ENV,
    CorruptKeyFileError,
    Identity,
    KeyFileError,
    PassphraseMismatchError,
    PassphraseRequiredError,
    UnencryptedKeyFileError,
    UnsupportedKeyFileVersionError,
    WrongPassphraseError,
    decode_key_file,
    encode_key_file,
    load_identity,
    passphrase_from_environment,
    resolve_passphrase,
    save_identity,
)

# The smallest Argon2id parameters keep these tests fast; one test below uses the MODERATE default.
FAST = {"opslimit": nacl.pwhash.argon2id.OPSLIMIT_MIN, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}
LOW_MEMORY = {"memlimit": nacl.pwhash.argon2id.MEMLIMIT_MIN}
PASS = "correct horse battery staple"
IDENTITY = Identity.from_seed(bytes(range(32)))


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _checksum(body: bytes) -> bytes:
    digest: bytes = nacl.hash.blake2b(body, digest_size=16, encoder=nacl.encoding.RawEncoder)
    return digest


def _reseal(data: bytes) -> bytes:
    """Recompute the trailing checksum after a deliberate edit (an intact file with chosen header fields)."""
    body = data[:-16]
    return body + _checksum(body)


@pytest.fixture(scope="module")
def encrypted() -> bytes:
    return encode_key_file(IDENTITY, PASS, **FAST)


def test_round_trip_encrypted(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY, PASS, **FAST)
    assert load_identity(path, PASS) == IDENTITY
    assert load_identity(str(path), PASS).peer_id == IDENTITY.peer_id
    assert _mode(path) == 0o600
    data = path.read_bytes()
    assert len(data) == 126
    assert data[:10] == b"P2PMSGKF\x01\x01"
    assert struct.unpack(">IQ", data[10:22]) == (FAST["opslimit"], FAST["memlimit"])
    assert IDENTITY.seed not in data
    assert os.listdir(tmp_path) == ["identity.key"]


def test_two_saves_use_fresh_salt_and_nonce(tmp_path: Path) -> None:
    a = encode_key_file(IDENTITY, PASS, **FAST)
    b = encode_key_file(IDENTITY, PASS, **FAST)
    assert a[22:38] != b[22:38]  # salt
    assert a[38:62] != b[38:62]  # nonce
    assert decode_key_file(a, PASS) == decode_key_file(b, PASS) == IDENTITY


def test_default_parameters_are_moderate(tmp_path: Path) -> None:
    path = tmp_path / "moderate.key"
    save_identity(path, IDENTITY, PASS)
    opslimit, memlimit = struct.unpack(">IQ", path.read_bytes()[10:22])
    assert opslimit == nacl.pwhash.argon2id.OPSLIMIT_MODERATE
    assert memlimit == nacl.pwhash.argon2id.MEMLIMIT_MODERATE
    assert memlimit < nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
    assert load_identity(path, PASS) == IDENTITY


def test_passphrase_is_unicode_normalised(tmp_path: Path) -> None:
    path = tmp_path / "nfc.key"
    save_identity(path, IDENTITY, "caf\u00e9", **FAST)
    assert load_identity(path, "cafe\u0301") == IDENTITY


def test_wrong_passphrase(encrypted: bytes) -> None:
    with pytest.raises(WrongPassphraseError, match="wrong passphrase"):
        decode_key_file(encrypted, PASS + "!")
    with pytest.raises(WrongPassphraseError):
        decode_key_file(encrypted, "")


def test_passphrase_required_to_load(tmp_path: Path, encrypted: bytes) -> None:
    path = tmp_path / "enc.key"
    path.write_bytes(encrypted)
    with pytest.raises(PassphraseRequiredError, match=PASSPHRASE_ENV):
        load_identity(path, None)


def test_passphrase_required_to_save_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "clear.key"
    with pytest.raises(PassphraseRequiredError, match="allow_unencrypted"):
        save_identity(path, IDENTITY, None)
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_unencrypted_only_when_allowed_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "clear.key"
    with caplog.at_level(logging.WARNING, logger="p2pmsg.identity"):
        save_identity(path, IDENTITY, None, allow_unencrypted=True)
    assert any("UNENCRYPTED" in r.getMessage() for r in caplog.records)
    data = path.read_bytes()
    assert len(data) == 58
    assert data[:10] == b"P2PMSGKF\x01\x00"
    assert data[10:42] == IDENTITY.seed
    assert _mode(path) == 0o600
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2pmsg.identity"):
        assert load_identity(path, None, allow_unencrypted=True) == IDENTITY
    assert any("NOT encrypted" in r.getMessage() for r in caplog.records)
    assert load_identity(path, "ignored", allow_unencrypted=True) == IDENTITY


@pytest.mark.parametrize("passphrase", [PASS, None])
def test_unencrypted_file_is_refused_unless_allowed(tmp_path: Path, passphrase: str | None) -> None:
    """Someone who can write the data dir plants a clear key file with a seed they know: loading must refuse it."""
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY, PASS, **FAST)
    planted = Identity.from_seed(b"\x66" * 32)
    path.write_bytes(encode_key_file(planted, None, allow_unencrypted=True))
    with pytest.raises(UnencryptedKeyFileError, match=r"NOT encrypted.*allow_unencrypted=True") as info:
        load_identity(path, passphrase)
    assert str(path) in str(info.value)
    with pytest.raises(UnencryptedKeyFileError, match="allow_unencrypted=True"):
        decode_key_file(path.read_bytes(), passphrase)
    assert load_identity(path, passphrase, allow_unencrypted=True) == planted
    assert decode_key_file(path.read_bytes(), passphrase, allow_unencrypted=True) == planted


def test_allow_unencrypted_does_not_weaken_an_encrypted_file(encrypted: bytes) -> None:
    assert decode_key_file(encrypted, PASS, allow_unencrypted=True) == IDENTITY
    with pytest.raises(WrongPassphraseError):
        decode_key_file(encrypted, PASS + "!", allow_unencrypted=True)
    with pytest.raises(PassphraseRequiredError):
        decode_key_file(encrypted, None, allow_unencrypted=True)


def test_passphrase_with_allow_unencrypted_still_encrypts(tmp_path: Path) -> None:
    path = tmp_path / "enc.key"
    save_identity(path, IDENTITY, PASS, allow_unencrypted=True, **FAST)
    assert path.read_bytes()[9] == 1
    with pytest.raises(PassphraseRequiredError):
        load_identity(path, None)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"opslimit": 0}, "opslimit 0"),
        ({"opslimit": 17}, "opslimit 17"),
        ({"opslimit": nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE + 1, **LOW_MEMORY}, "opslimit 5 is outside \\[1, 4\\]"),
        ({"memlimit": 4096}, "memlimit 4096"),
        ({"opslimit": 1, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_MODERATE + 1024}, "memlimit 268436480"),
        ({"opslimit": 1, "memlimit": nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE}, "memlimit 1073741824 bytes is outside"),
        ({"memlimit": (1 << 30) + 1}, "memlimit 1073741825"),
    ],
)
def test_save_refuses_out_of_bounds_parameters(tmp_path: Path, kwargs: dict[str, int], reason: str) -> None:
    with pytest.raises(KeyFileError, match=reason):
        save_identity(tmp_path / "x.key", IDENTITY, PASS, **kwargs)
    assert os.listdir(tmp_path) == []


def test_save_refuses_empty_passphrase(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="must not be empty"):
        save_identity(tmp_path / "x.key", IDENTITY, "", **FAST)


# --- corruption ---------------------------------------------------------------------------------------------------


def test_every_truncation_is_corrupt(encrypted: bytes) -> None:
    for size in range(len(encrypted)):
        with pytest.raises(CorruptKeyFileError) as info:
            decode_key_file(encrypted[:size], PASS)
        assert ("truncated" in str(info.value)) or ("bad magic" in str(info.value)), size
    with pytest.raises(CorruptKeyFileError, match="truncated \\(100 of 126 bytes\\)"):
        decode_key_file(encrypted[:100], PASS)


def test_truncated_file_on_disk(tmp_path: Path, encrypted: bytes) -> None:
    path = tmp_path / "short.key"
    path.write_bytes(encrypted[:50])
    with pytest.raises(CorruptKeyFileError, match="truncated"):
        load_identity(path, PASS)
    path.write_bytes(b"")
    with pytest.raises(CorruptKeyFileError):
        load_identity(path, PASS)


def test_bad_magic(encrypted: bytes) -> None:
    with pytest.raises(CorruptKeyFileError, match="bad magic"):
        decode_key_file(b"X" + encrypted[1:], PASS)
    with pytest.raises(CorruptKeyFileError, match="bad magic"):
        decode_key_file(b"-----BEGIN OPENSSH PRIVATE KEY-----\n", PASS)


def test_every_single_bit_flip_is_corrupt_not_wrong_passphrase(encrypted: bytes) -> None:
    for index in range(len(encrypted)):
        for bit in range(8):
            flipped = bytearray(encrypted)
            flipped[index] ^= 1 << bit
            with pytest.raises(CorruptKeyFileError):
                decode_key_file(bytes(flipped), PASS)


def test_bit_flip_in_unencrypted_file_is_corrupt() -> None:
    data = encode_key_file(IDENTITY, None, allow_unencrypted=True)
    flipped = bytearray(data)
    flipped[20] ^= 0x10
    with pytest.raises(CorruptKeyFileError, match="checksum mismatch"):
        decode_key_file(bytes(flipped), None)


def test_unsupported_version(encrypted: bytes) -> None:
    for version in (0, 2, 255):
        data = bytearray(encrypted)
        data[8] = version
        with pytest.raises(UnsupportedKeyFileVersionError, match=f"version {version} is not supported"):
            decode_key_file(_reseal(bytes(data)), PASS)
    future = b"P2PMSGKF\x02" + b"\x00" * 200
    with pytest.raises(UnsupportedKeyFileVersionError):
        decode_key_file(_reseal(future + b"\x00" * 16), PASS)


def test_unknown_kdf_is_corrupt(encrypted: bytes) -> None:
    data = bytearray(encrypted)
    data[9] = 7
    with pytest.raises(CorruptKeyFileError, match="unknown kdf id 7"):
        decode_key_file(_reseal(bytes(data)), PASS)


def test_wrong_length_with_valid_checksum_is_corrupt(encrypted: bytes) -> None:
    longer = encrypted[:-16] + b"\x00"
    with pytest.raises(CorruptKeyFileError, match="127 bytes"):
        decode_key_file(_reseal(longer + b"\x00" * 16), PASS)


@pytest.mark.parametrize(
    ("opslimit", "memlimit", "reason"),
    [
        (1, 1 << 40, "memlimit 1099511627776"),
        (16, 1 << 30, "opslimit 16"),  # the old maximum: 16 passes over 1 GiB
        (1, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE, "memlimit 1073741824 bytes is outside \\[8192, 268435456\\]"),
        (1, nacl.pwhash.argon2id.MEMLIMIT_MODERATE + 1024, "memlimit 268436480"),
        (nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE + 1, 8192, "opslimit 5 is outside \\[1, 4\\]"),
        (1, (1 << 64) - 1, "memlimit"),
        (1, 0, "memlimit 0"),
        (0, 8192, "opslimit 0"),
        ((1 << 32) - 1, 8192, "opslimit 4294967295"),
    ],
)
def test_hostile_kdf_parameters_are_refused_before_deriving(
    encrypted: bytes, opslimit: int, memlimit: int, reason: str
) -> None:
    data = encrypted[:10] + struct.pack(">IQ", opslimit, memlimit) + encrypted[22:]
    # Refused before any key derivation: with these parameters Argon2id would exhaust memory or never finish.
    with pytest.raises(CorruptKeyFileError, match=reason):
        decode_key_file(_reseal(data), PASS)


def test_kdf_limits_are_capped_at_moderate_memory() -> None:
    assert MAX_MEMLIMIT == nacl.pwhash.argon2id.MEMLIMIT_MODERATE
    assert MAX_OPSLIMIT == nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
    # The most passes still allowed round-trip (with little memory, to stay fast).
    data = encode_key_file(IDENTITY, PASS, opslimit=MAX_OPSLIMIT, memlimit=nacl.pwhash.argon2id.MEMLIMIT_MIN)
    assert decode_key_file(data, PASS) == IDENTITY


def test_oversized_file_is_refused(tmp_path: Path, encrypted: bytes) -> None:
    path = tmp_path / "big.key"
    path.write_bytes(encrypted + b"\x00" * 10_000)
    with pytest.raises(CorruptKeyFileError, match="larger than"):
        load_identity(path, PASS)


def test_missing_file_raises_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_identity(tmp_path / "nope.key", PASS)


def test_error_hierarchy() -> None:
    for cls in (
        WrongPassphraseError,
        CorruptKeyFileError,
        UnsupportedKeyFileVersionError,
        PassphraseRequiredError,
        PassphraseMismatchError,
        UnencryptedKeyFileError,
    ):
        assert issubclass(cls, KeyFileError)
    assert not issubclass(UnencryptedKeyFileError, CorruptKeyFileError | WrongPassphraseError)
    assert issubclass(KeyFileError, P2PMsgError)
    assert len({WrongPassphraseError, CorruptKeyFileError, UnsupportedKeyFileVersionError}) == 3
    assert not issubclass(WrongPassphraseError, CorruptKeyFileError)
    assert not issubclass(CorruptKeyFileError, WrongPassphraseError)


# --- file system behaviour ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_mode_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "identity.key"
    old = os.umask(umask)
    try:
        save_identity(path, IDENTITY, PASS, **FAST)
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
    assert load_identity(path, PASS) == IDENTITY


def test_overwrite_replaces_file_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(b"old contents")
    path.chmod(0o644)
    save_identity(path, IDENTITY, PASS, **FAST)
    assert _mode(path) == 0o600
    assert load_identity(path, PASS) == IDENTITY
    assert os.listdir(tmp_path) == ["identity.key"]


def test_load_warns_about_loose_mode(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY, PASS, **FAST)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="p2pmsg.identity"):
        load_identity(path, PASS)
    assert any("0o644" in r.getMessage() for r in caplog.records)


def test_interrupted_replace_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY, PASS, **FAST)
    before = path.read_bytes()

    def failing_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device (simulated)")

    # A crash/failure at the rename cannot be caused for real in a test: simulate it.
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        save_identity(path, Identity.from_seed(b"\x09" * 32), PASS, **FAST)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["identity.key"]
    assert load_identity(path, PASS) == IDENTITY


def test_interrupted_fsync_keeps_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "identity.key"
    save_identity(path, IDENTITY, PASS, **FAST)
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        save_identity(path, Identity.from_seed(b"\x09" * 32), PASS, **FAST)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["identity.key"]


def test_save_into_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        save_identity(tmp_path / "missing" / "identity.key", IDENTITY, PASS, **FAST)


def test_stale_temp_files_do_not_block_saving(tmp_path: Path) -> None:
    (tmp_path / ".identity.key.0000000000000000.tmp").write_bytes(b"stale")
    save_identity(tmp_path / "identity.key", IDENTITY, PASS, **FAST)
    assert load_identity(tmp_path / "identity.key", PASS) == IDENTITY


# --- passphrase input -----------------------------------------------------------------------------------------------


class Prompts:
    """Answers prompts from a list and records them (keyboard input injected, not a mock of the code under test)."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.asked: list[str] = []

    def __call__(self, text: str) -> str:
        self.asked.append(text)
        if not self.answers:
            raise EOFError
        return self.answers.pop(0)


def test_passphrase_from_environment_mapping() -> None:
    prompts = Prompts()
    assert resolve_passphrase(env={PASSPHRASE_ENV: "from env"}, prompt=prompts) == "from env"
    assert resolve_passphrase(confirm=True, env={PASSPHRASE_ENV: "from env"}, prompt=prompts) == "from env"
    assert prompts.asked == []


def test_passphrase_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "process env")
    assert resolve_passphrase(prompt=Prompts()) == "process env"


def test_passphrase_prompt() -> None:
    prompts = Prompts("typed")
    assert resolve_passphrase(env={}, prompt=prompts) == "typed"
    assert len(prompts.asked) == 1


def test_passphrase_prompt_with_confirmation() -> None:
    prompts = Prompts("typed", "typed")
    assert resolve_passphrase(confirm=True, env={}, prompt=prompts) == "typed"
    assert len(prompts.asked) == 2


def test_passphrase_confirmation_mismatch() -> None:
    with pytest.raises(PassphraseMismatchError):
        resolve_passphrase(confirm=True, env={}, prompt=Prompts("typed", "typo"))


def test_passphrase_end_of_input() -> None:
    with pytest.raises(PassphraseRequiredError, match=PASSPHRASE_ENV):
        resolve_passphrase(env={}, prompt=Prompts())


def test_passphrase_from_a_file(tmp_path: Path) -> None:
    """``$P2PMSG_PASSPHRASE_FILE`` (e.g. a systemd credential) keeps the passphrase out of the node's environment."""
    secret = tmp_path / "passphrase"
    secret.write_bytes("s\u00e9cret with spaces \n".encode())
    prompts = Prompts()
    env = {PASSPHRASE_FILE_ENV: str(secret)}
    assert resolve_passphrase(env=env, prompt=prompts) == "s\u00e9cret with spaces "  # one trailing newline removed
    assert prompts.asked == []
    secret.write_bytes(b"windows\r\n")
    assert passphrase_from_environment(env) == "windows"
    secret.write_bytes(b"two\n\n")
    assert passphrase_from_environment(env) == "two\n"  # only one line end is removed
    # $P2PMSG_PASSPHRASE wins over the file.
    assert passphrase_from_environment({**env, PASSPHRASE_ENV: "direct"}) == "direct"
    assert passphrase_from_environment({}) is None


def test_passphrase_from_a_systemd_credential(tmp_path: Path) -> None:
    """``LoadCredential=p2pmsg-passphrase:...`` puts the file in ``$CREDENTIALS_DIRECTORY``."""
    (tmp_path / PASSPHRASE_CREDENTIAL).write_text("from systemd\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert passphrase_from_environment(env) == "from systemd"
    other = tmp_path / "other"
    other.write_text("named file\n")
    assert passphrase_from_environment({**env, PASSPHRASE_FILE_ENV: str(other)}) == "named file"
    # A credentials directory without our credential (another service's) supplies nothing.
    assert passphrase_from_environment({"CREDENTIALS_DIRECTORY": str(tmp_path / "missing")}) is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read it"),
        (b"x" * 4097, "larger than 4096 bytes"),
        (b"\xff\xfe", "not UTF-8"),
        (b"", "empty"),
        (b"\n", "empty"),
    ],
    ids=["missing", "too-large", "not-utf8", "empty", "only-a-newline"],
)
def test_passphrase_file_that_cannot_be_used(tmp_path: Path, content: bytes | None, reason: str) -> None:
    """Never a fallback to the prompt, and an empty file never means "no passphrase" (an unencrypted key file may
    only be loaded on an explicit request: ``--no-passphrase`` or an empty ``$P2PMSG_PASSPHRASE``)."""
    secret = tmp_path / "passphrase"
    if content is not None:
        secret.write_bytes(content)
    with pytest.raises(PassphraseRequiredError, match=reason) as caught:
        resolve_passphrase(env={PASSPHRASE_FILE_ENV: str(secret)}, prompt=Prompts("never asked"))
    assert str(secret) in str(caught.value)


def test_passphrase_from_a_named_pipe_nobody_writes_to_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO with no writer used to make open() wait forever (p2pmsg run hung with no message)."""
    fifo = tmp_path / "passphrase.fifo"
    os.mkfifo(fifo)
    outcome: list[BaseException | str] = []

    def read() -> None:
        try:
            outcome.append(passphrase_from_environment({PASSPHRASE_FILE_ENV: str(fifo)}) or "")
        except BaseException as exc:  # handed to the test thread below
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # free the blocked open() before failing: one writer that writes nothing
        os.close(os.open(fifo, os.O_WRONLY))
        reader.join(timeout=10)
        pytest.fail("reading a FIFO with no writer blocked")
    [result] = outcome
    assert isinstance(result, PassphraseRequiredError)
    assert "a pipe that no process writes to" in str(result) and str(fifo) in str(result)


def test_passphrase_from_a_pipe_that_is_being_written() -> None:
    """A pipe with a writer (as ``<(pass show ...)`` gives) is waited for and read to its end."""
    read_end, write_end = os.pipe()
    path = f"/proc/self/fd/{read_end}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{read_end}"

    def write() -> None:
        time.sleep(0.2)  # the reader is already waiting
        os.write(write_end, b"from a pipe\n")
        os.close(write_end)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert passphrase_from_environment({PASSPHRASE_FILE_ENV: path}) == "from a pipe"
    finally:
        writer.join()
        os.close(read_end)


# --- the worked examples of docs/protocol.md (section 1) ----------------------------------------------------------

DOC_ENCRYPTED = (
    "5032504d53474b46010100000001000000000000200000"
    "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f2021222324252627"
    "8079f3d8398651db382713800092198312756b55087ab6eb1f6ed83666941ba42878263581330cdff4849fef7e854d24"
    "140a5299f3b957cbdc7b9c9d2143a05b"
)
DOC_UNENCRYPTED = (
    "5032504d53474b460100"
    "7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "35a6a491325e92babd2779e3173e830c"
)


def _vector_identity() -> Identity:
    v = load_vectors("libp2p-peer-id.json")["ed25519"]
    return Identity.from_seed(bytes.fromhex(v["private_key_protobuf_hex"])[4:36])


def test_documented_encrypted_example_decodes() -> None:
    identity = _vector_identity()
    assert decode_key_file(bytes.fromhex(DOC_ENCRYPTED), "correct horse battery staple") == identity
    with pytest.raises(WrongPassphraseError):
        decode_key_file(bytes.fromhex(DOC_ENCRYPTED), "Correct horse battery staple")


def test_documented_unencrypted_example_is_exact() -> None:
    identity = _vector_identity()
    assert encode_key_file(identity, None, allow_unencrypted=True).hex() == DOC_UNENCRYPTED
    assert decode_key_file(bytes.fromhex(DOC_UNENCRYPTED), None, allow_unencrypted=True) == identity
    with pytest.raises(UnencryptedKeyFileError):
        decode_key_file(bytes.fromhex(DOC_UNENCRYPTED), "correct horse battery staple")


def test_a_key_file_that_is_a_named_pipe_is_refused_without_waiting(tmp_path: Path) -> None:
    """QA: `id` and `run` hung with no output when identity.key was a named pipe."""
    error = error_reading_a_named_pipe(lambda path: load_identity(path, None), tmp_path / "identity.key")
    assert isinstance(error, OSError) and "a named pipe, not a regular file" in str(error)
