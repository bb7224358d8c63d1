"""Ed25519-signed tree heads: C2SP tlog-checkpoint text inside a C2SP signed note."""

# The formats followed here, cited below by document and section:
#   signed-note     c2sp.org/signed-note: "Format", "Signatures", "Ed25519 signatures".
#   tlog-checkpoint c2sp.org/tlog-checkpoint: "Note text", "Signatures".
#   sumdb/note      golang.org/x/mod/sumdb/note, the reference implementation: the
#                   verifier key "<name>+<hash>+<keydata>" (NewVerifier) and Open's
#                   limit of 100 signatures, both kept here for interoperability.

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from jitgate.common.errors import JitgateError
from jitgate.common.keys import load_private, load_public_keys

# signed-note "Format": verifiers SHOULD bound the signature count or the note's
# size and MUST accept at least 16 signatures; sumdb/note's Open refuses a 101st.
# 100 Ed25519 signature lines of about 110 bytes fit in MAX_NOTE_BYTES, so for
# this module's notes the signature limit is reached before the size limit.
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 16 * 1024
ROOT_SIZE = 32  # tlog-checkpoint "Note text" 3: an RFC 6962 (SHA-256) root hash.
_MAX_SIZE = 2**64 - 1  # Tree sizes are uint64 in every implementation.

_ED25519 = 0x01  # signed-note "Signature types": the Ed25519 type byte.
_SIG_PREFIX = "\u2014 "  # signed-note "Format": em dash (U+2014), space.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # signed-note "Format": below U+0020 but newline.
_HEX8 = re.compile("[0-9a-fA-F]{8}")


class CheckpointError(JitgateError, ValueError):
    """Root of the errors raised here for bad notes, checkpoints and keys."""


class MalformedNote(CheckpointError):
    """The input is not a well-formed signed note; no signature was checked."""


class MalformedCheckpoint(MalformedNote):
    """The note text is not a well-formed tlog-checkpoint."""


class InvalidKey(CheckpointError):
    """A key name, verifier key string or list of verifiers is unusable."""


class UnknownKey(CheckpointError):
    """No signature in the note is by a known key (matching both name and key ID)."""


class BadSignature(CheckpointError):
    """A signature by a known key does not verify: the note was altered or forged."""


def _b64decode(text: str) -> bytes | None:
    """Return the bytes of canonical standard base64 (RFC 4648, section 4), else None."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Refusing non-canonical spellings (stray padding bits) keeps one text per value.
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def _control(text: str) -> str | None:
    """Name the first forbidden control character in text, or return None."""
    found = _CONTROL.search(text)
    if found is None:
        return None
    if found.group() == "\r":
        return "a carriage return (lines must end in LF alone, not CRLF)"
    return f"control character U+{ord(found.group()):04X}"


def _name_problem(name: str) -> str | None:
    """Say why name cannot be a key name (signed-note "Format"), or return None."""
    if not name:
        return "is empty"
    if "+" in name:
        return "contains '+'"
    # str.isspace covers Go's unicode.IsSpace, which sumdb/note uses, and more.
    if any(char.isspace() or char < " " for char in name):
        return "contains a space or control character"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _line_problem(line: object) -> str | None:
    """Say why line cannot be one non-empty line of note text, or return None."""
    if not isinstance(line, str) or not line:
        return "is empty or not text"
    if "\n" in line:
        return "contains a newline"
    problem = _control(line)
    if problem:
        return f"contains {problem}"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _key_id(name: str, key_data: bytes) -> int:
    """Return the key ID: SHA-256(name || 0x0A || type byte || public key)[:4], big-endian."""
    # signed-note "Signatures" (recommended) and "Ed25519 signatures" (required).
    digest = hashlib.sha256(name.encode("utf-8") + b"\n" + key_data).digest()
    return int.from_bytes(digest[:4], "big")


def _raw(public_key: Ed25519PublicKey) -> bytes:
    """Return the 32-byte RFC 8032 encoding of public_key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse any value that to_text could not write as a valid checkpoint."""
        object.__setattr__(self, "extensions", tuple(self.extensions))
        # tlog-checkpoint "Note text" 1 and 4: origin and extensions are non-empty lines.
        lines = {"origin": self.origin}
        lines.update((f"extension line {n}", ext) for n, ext in enumerate(self.extensions, 1))
        for what, line in lines.items():
            problem = _line_problem(line)
            if problem:
                raise MalformedCheckpoint(f"{what} {problem}")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise MalformedCheckpoint("tree size is not an integer")
        if not 0 <= self.size <= _MAX_SIZE:
            raise MalformedCheckpoint(f"tree size {self.size} is outside 0..2^64-1")
        if not isinstance(self.root, bytes) or len(self.root) != ROOT_SIZE:
            length = len(self.root) if isinstance(self.root, bytes) else "not"
            raise MalformedCheckpoint(f"root hash is {length} bytes, not {ROOT_SIZE}")

    def to_text(self) -> str:
        """Return the checkpoint's note text (tlog-checkpoint "Note text")."""
        lines = (self.origin, str(self.size), base64.b64encode(self.root).decode("ascii"))
        return "".join(f"{line}\n" for line in lines + self.extensions)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse checkpoint note text strictly; raise MalformedCheckpoint naming the fault."""
        problem = _control(text)
        if problem:
            raise MalformedCheckpoint(f"checkpoint contains {problem}")
        # tlog-checkpoint "Note text": at least three non-empty newline-ended lines.
        if not text.endswith("\n"):
            raise MalformedCheckpoint("checkpoint text does not end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedCheckpoint("checkpoint needs origin, tree size and root hash lines")
        for number, line in enumerate(lines, 1):
            if not line:
                raise MalformedCheckpoint(f"checkpoint line {number} is empty")
        origin, size_text, root_text, *extensions = lines
        # "Note text" 2: ASCII decimal, no leading zeroes unless the tree is empty.
        if not size_text.isascii() or not size_text.isdigit():
            raise MalformedCheckpoint(f"tree size {size_text!r} is not a decimal number")
        if size_text != "0" and size_text.startswith("0"):
            raise MalformedCheckpoint(f"tree size {size_text!r} has leading zeros")
        if len(size_text) > len(str(_MAX_SIZE)) or int(size_text) > _MAX_SIZE:
            raise MalformedCheckpoint(f"tree size {size_text} does not fit in 64 bits")
        # "Note text" 3: standard base64 (RFC 4648, section 4) of the root hash.
        root = _b64decode(root_text)
        if root is None:
            raise MalformedCheckpoint("root hash is not canonical standard base64")
        return cls(origin, int(size_text), root, tuple(extensions))


@dataclass(frozen=True)
class NoteVerifier:
    """An Ed25519 public key trusted under a key name to sign notes."""

    name: str
    public_key: Ed25519PublicKey = field(compare=False)
    raw: bytes = field(init=False, repr=False)
    key_id: int = field(init=False)

    def __post_init__(self) -> None:
        """Check the name and derive the raw key and its key ID."""
        problem = _name_problem(self.name)
        if problem:
            raise InvalidKey(f"key name {self.name!r} {problem}")
        raw = _raw(self.public_key)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "key_id", _key_id(self.name, bytes([_ED25519]) + raw))

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Report whether signature is this key's RFC 8032 signature of message."""
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class NoteSigner:
    """An Ed25519 private key that signs notes under a key name."""

    name: str
    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    verifier: NoteVerifier = field(init=False)

    def __post_init__(self) -> None:
        """Check the name and derive the matching verifier."""
        object.__setattr__(self, "verifier", NoteVerifier(self.name, self.private_key.public_key()))

    @property
    def key_id(self) -> int:
        """Return the key ID that prefixes this signer's signatures."""
        return self.verifier.key_id

    def sign(self, checkpoint: Checkpoint) -> str:
        """Return checkpoint as a signed note bearing this key's signature."""
        return sign_note(checkpoint.to_text(), self)


def verifier_key_string(name: str, public_key: Ed25519PublicKey) -> str:
    """Return the verifier key "<name>+<8 hex digit key ID>+<base64(0x01 || key)>"."""
    verifier = NoteVerifier(name, public_key)
    key_data = base64.b64encode(bytes([_ED25519]) + verifier.raw).decode("ascii")
    return f"{name}+{verifier.key_id:08x}+{key_data}"


def parse_verifier_key(vkey: str) -> NoteVerifier:
    """Parse a verifier key string as sumdb/note's NewVerifier does, but strictly."""
    # The name holds no '+' and the hex ID none either, so the first two split it.
    name, _, rest = vkey.partition("+")
    id_hex, _, key_b64 = rest.partition("+")
    problem = _name_problem(name)
    if problem:
        raise InvalidKey(f"verifier key name {name!r} {problem}")
    if not _HEX8.fullmatch(id_hex):
        raise InvalidKey("verifier key ID is not 8 hex digits")
    key_data = _b64decode(key_b64)
    if not key_data:
        raise InvalidKey("verifier key data is not canonical standard base64")
    if _key_id(name, key_data) != int(id_hex, 16):
        raise InvalidKey(f"verifier key ID {id_hex} does not match its name and key")
    if key_data[0] != _ED25519:
        raise InvalidKey(f"verifier key type 0x{key_data[0]:02x} is not Ed25519 (0x01)")
    if len(key_data) != 1 + 32:
        raise InvalidKey(f"Ed25519 verifier key is {len(key_data) - 1} bytes, not 32")
    try:
        public_key = Ed25519PublicKey.from_public_bytes(key_data[1:])
    except ValueError as exc:
        raise InvalidKey("verifier key is not an Ed25519 public key") from exc
    return NoteVerifier(name, public_key)


def load_signer(name: str, path: Path) -> NoteSigner:
    """Load a PKCS#8 PEM Ed25519 private key as a signer under name."""
    return NoteSigner(name, load_private(path))


def load_verifiers(name: str, path: Path) -> tuple[NoteVerifier, ...]:
    """Load every PEM Ed25519 public key in path as a verifier under name."""
    return tuple(NoteVerifier(name, key) for key in load_public_keys(path))


def _check_text(text: str) -> bytes:
    """Return note text as UTF-8 if it can be signed, else raise MalformedNote."""
    # signed-note "Format": UTF-8, no control characters but newline, final newline.
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedNote("note text is not valid UTF-8") from exc
    problem = _control(text)
    if problem:
        raise MalformedNote(f"note text contains {problem}")
    if not text.endswith("\n"):
        raise MalformedNote("note text does not end in a newline")
    return data


def sign_note(text: str, *signers: NoteSigner) -> str:
    """Return text followed by a blank line and one signature line per signer."""
    message = _check_text(text)
    if not 1 <= len(signers) <= MAX_SIGNATURES:
        raise MalformedNote(f"a note takes 1 to {MAX_SIGNATURES} signatures, not {len(signers)}")
    # signed-note "Signatures": "— <key name> base64(32-bit key ID || signature)".
    lines = []
    for signer in signers:
        blob = signer.key_id.to_bytes(4, "big") + signer.private_key.sign(message)
        lines.append(f"{_SIG_PREFIX}{signer.name} {base64.b64encode(blob).decode('ascii')}\n")
    note = text + "\n" + "".join(lines)
    if len(note.encode("utf-8")) > MAX_NOTE_BYTES:
        raise MalformedNote(f"signed note would exceed {MAX_NOTE_BYTES} bytes")
    return note


_Signature = tuple[str, int, bytes]


def _split(note: str | bytes) -> tuple[str, list[_Signature]]:
    """Check a note's syntax, bounded and before any crypto; return its text and signatures."""
    if len(note) > MAX_NOTE_BYTES:
        raise MalformedNote(f"note is over {MAX_NOTE_BYTES} bytes")
    if isinstance(note, str):
        try:
            note = note.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MalformedNote("note is not valid UTF-8") from exc
        if len(note) > MAX_NOTE_BYTES:
            raise MalformedNote(f"note is over {MAX_NOTE_BYTES} bytes")
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNote("note is not valid UTF-8") from exc
    problem = _control(decoded)
    if problem:
        raise MalformedNote(f"note contains {problem}")
    # signed-note "Format": the text (with its final newline) ends at the last blank
    # line; after it come one or more signature lines, each ending in a newline.
    split = decoded.rfind("\n\n")
    if split < 0:
        raise MalformedNote("note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block:
        raise MalformedNote("note has no signature lines after its last blank line")
    if not block.endswith("\n"):
        raise MalformedNote("note's last signature line does not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"note has {len(lines)} signatures, over the {MAX_SIGNATURES} limit")
    signatures = []
    for number, line in enumerate(lines, 1):
        if not line.startswith(_SIG_PREFIX):
            raise MalformedNote(f"signature line {number} does not start with an em dash and space")
        name, _, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        name_problem = _name_problem(name)
        if name_problem:
            raise MalformedNote(f"signature line {number}: key name {name!r} {name_problem}")
        blob = _b64decode(encoded)
        # sumdb/note's Open: at least the 4-byte key ID and one byte of signature.
        if blob is None or len(blob) < 5:
            raise MalformedNote(f"signature line {number} is not base64 of key ID and signature")
        signatures.append((name, int.from_bytes(blob[:4], "big"), blob[4:]))
    return text, signatures


def _verify(text: str, signatures: list[_Signature], verifiers: Iterable[NoteVerifier]) -> None:
    """Raise unless a known key signed text and every known key's signature verifies."""
    known: dict[tuple[str, int], NoteVerifier] = {}
    for verifier in verifiers:
        other = known.setdefault((verifier.name, verifier.key_id), verifier)
        if other.raw != verifier.raw:
            raise InvalidKey(f"two verifier keys are both {verifier.name}+{verifier.key_id:08x}")
    message = text.encode("utf-8")
    verified = 0
    for name, key_id, signature in signatures:
        match = known.get((name, key_id))
        # signed-note "Signatures": ignore unknown keys, even those sharing a known
        # key's name or ID (not both); verify every known one, reject the whole note
        # if one fails, and reject it unless at least one verifies.
        if match is None:
            continue
        if not match.verify(message, signature):
            raise BadSignature(f"signature by {name}+{key_id:08x} does not verify")
        verified += 1
    if not verified:
        seen = [f"{name}+{key_id:08x}" for name, key_id, _ in signatures]
        more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
        raise UnknownKey(f"note has no signature by a known key (by {', '.join(seen[:3])}{more})")


def open_note(note: str | bytes, verifiers: Iterable[NoteVerifier]) -> str:
    """Return the text of a signed note once a known key's signature verifies."""
    text, signatures = _split(note)
    _verify(text, signatures, verifiers)
    return text


def open_signed(note: str | bytes, verifiers: Iterable[NoteVerifier]) -> Checkpoint:
    """Return the checkpoint in a signed note once a known key's signature verifies."""
    text, signatures = _split(note)
    # Parsed before verifying so every syntax fault is MalformedNote, found without
    # crypto; nothing parsed is returned unless a signature verifies (signed-note).
    checkpoint = Checkpoint.parse(text)
    _verify(text, signatures, verifiers)
    return checkpoint
