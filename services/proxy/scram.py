"""A SCRAM-SHA-256 client (RFC 5802, RFC 7677) as PostgreSQL speaks it.

PostgreSQL documentation, "Frontend/Backend Protocol", section "SASL
Authentication" (53.3 in PostgreSQL 18): the mechanism is SCRAM-SHA-256, the
client-first-message has the gs2 header "n,," (no channel binding) and an
empty username, "n=,", because the server takes the user from the start-up
message. The server's signature in server-final-message is checked: a server
that cannot produce it does not know the role's verifier, and the exchange
fails (mutual authentication, RFC 5802 section 5).

Pure functions and one small state class: no I/O. Computing the salted
password is deliberately slow (PBKDF2), so an asyncio caller runs
`ScramClient.final_message` in a thread.

The password is prepared with SASLprep (RFC 4013) exactly as PostgreSQL does
in src/common/saslprep.c: an ASCII password is used as it is; otherwise, if
SASLprep rejects the password (a prohibited or unassigned character, or a
bidirectional-text violation), the raw UTF-8 bytes are used instead. The
server prepares the password the same way when it stores the verifier
(CREATE ROLE ... PASSWORD), so both sides hash the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
"""The channel-binding variant; this client does not implement channel binding."""
GS2_HEADER = "n,,"
"""RFC 5802 section 7: "n" = the client does not support channel binding; no authzid."""
CHANNEL_BINDING = base64.b64encode(GS2_HEADER.encode()).decode()  # "biws"
NONCE_BYTES = 18
"""Random bytes in the client nonce, as libpq (SCRAM_RAW_NONCE_LEN)."""
MIN_ITERATIONS = 4096
"""RFC 7677 section 4: the iteration count SHOULD be at least 4096."""
MAX_ITERATIONS = 1_000_000
"""PostgreSQL's default is 4096; more than this would cost a server-chosen second of CPU."""
MAX_MESSAGE_BYTES = 4096
"""Server messages are about 100 bytes; anything far longer is not SCRAM."""


class ScramError(Exception):
    """The exchange failed: a malformed or wrong server message, or a bad signature."""


def _prohibited(char: str) -> bool:
    # RFC 4013 section 2.3: tables C.1.2, C.2.1, C.2.2, C.3, C.4, C.5, C.6, C.7, C.8, C.9;
    # section 2.5: unassigned code points (A.1) are prohibited in stored strings.
    return (
        stringprep.in_table_c12(char)
        or stringprep.in_table_c21_c22(char)
        or stringprep.in_table_c3(char)
        or stringprep.in_table_c4(char)
        or stringprep.in_table_c5(char)
        or stringprep.in_table_c6(char)
        or stringprep.in_table_c7(char)
        or stringprep.in_table_c8(char)
        or stringprep.in_table_c9(char)
        or stringprep.in_table_a1(char)
    )


def saslprep(text: str) -> str:
    """Return text prepared by SASLprep (RFC 4013) as PostgreSQL does; ValueError if refused."""
    # Like pg_saslprep (src/common/saslprep.c), the prohibition and bidirectional
    # checks look at the mapped string, before normalization, and an empty one is refused.
    # Section 2.1: non-ASCII spaces (C.1.2) map to SPACE, B.1 characters to nothing.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    if not mapped:
        raise ValueError("SASLprep maps the text to nothing")
    for char in mapped:
        if _prohibited(char):
            raise ValueError(f"SASLprep prohibits U+{ord(char):04X}")
    # Section 2.4, RFC 3454 section 6: text with right-to-left characters has no
    # left-to-right ones, and starts and ends with a right-to-left character.
    if any(stringprep.in_table_d1(c) for c in mapped):
        if any(stringprep.in_table_d2(c) for c in mapped):
            raise ValueError("SASLprep refuses mixed left-to-right and right-to-left text")
        if not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1])):
            raise ValueError("SASLprep refuses right-to-left text not bounded by such characters")
    # Section 2.2: normalization form KC. Unassigned code points were refused above,
    # so this agrees with the server's (newer) Unicode tables.
    return unicodedata.normalize("NFKC", mapped)


def prepare_password(password: str) -> bytes:
    """Return the bytes PostgreSQL hashes for password: SASLprep, else the raw UTF-8."""
    try:
        raw = password.encode("utf-8")
    except UnicodeEncodeError:
        raise ScramError("the password is not valid Unicode text") from None
    if password.isascii():
        # pg_saslprep: "An ASCII string requires no further processing."
        return raw
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        # pg_be_scram_build_secret and libpq both fall back to the raw password.
        return raw


def client_nonce() -> str:
    """A fresh client nonce: NONCE_BYTES random bytes, base64 (printable, no commas)."""
    return base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode("ascii")


def _escape_username(name: str) -> str:
    # RFC 5802 section 5.1: saslname, with "=" as "=3D" and "," as "=2C".
    return name.replace("=", "=3D").replace(",", "=2C")


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


@functools.lru_cache(maxsize=64)
def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """RFC 5802 section 3: Hi(Normalize(password), salt, i), PBKDF2 with HMAC-SHA-256.

    Cached: PBKDF2 is most of a login's cost (about 1.3 ms at PostgreSQL's
    4096 iterations), and a server advertises the same salt for a role until
    its password changes. RFC 5802 section 5.1 lets a client cache
    SaltedPassword for re-authentication to the same service; a new password
    brings a new salt, which misses the cache. The password is held in
    memory for the life of the process anyway.
    """
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def client_proof(salted: bytes, auth_message: bytes) -> bytes:
    """RFC 5802 section 3: ClientKey XOR HMAC(H(ClientKey), AuthMessage)."""
    client_key = _hmac(salted, b"Client Key")
    signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
    return bytes(a ^ b for a, b in zip(client_key, signature, strict=True))


def server_signature(salted: bytes, auth_message: bytes) -> bytes:
    """RFC 5802 section 3: HMAC(HMAC(SaltedPassword, "Server Key"), AuthMessage)."""
    return _hmac(_hmac(salted, b"Server Key"), auth_message)


def _text(message: bytes, what: str) -> str:
    if len(message) > MAX_MESSAGE_BYTES:
        raise ScramError(f"the {what} is {len(message)} bytes long")
    try:
        text = message.decode("ascii")
    except UnicodeDecodeError:
        raise ScramError(f"the {what} is not ASCII") from None
    if not text.isprintable():
        raise ScramError(f"the {what} has control characters")
    return text


def _attribute(part: str, name: str, what: str) -> str:
    if not part.startswith(f"{name}="):
        raise ScramError(f"the {what} has no {name}= attribute where one is expected")
    return part[2:]


def _base64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ScramError(f"the {what} is not valid base64") from None


@dataclass(frozen=True)
class ServerFirst:
    """The server-first-message: the combined nonce, the salt and the iteration count."""

    nonce: str
    salt: bytes
    iterations: int


def parse_server_first(message: bytes, client_nonce: str) -> ServerFirst:
    """Parse and check a server-first-message (RFC 5802 section 7) for client_nonce."""
    what = "server-first-message"
    parts = _text(message, what).split(",")
    if parts[0].startswith("m="):
        # Section 5.1: a mandatory extension this client does not know must fail the exchange.
        raise ScramError("the server requires a SCRAM extension (m=) this client does not know")
    if len(parts) < 3:
        raise ScramError(f"the {what} is malformed")
    nonce = _attribute(parts[0], "r", what)
    salt_text = _attribute(parts[1], "s", what)
    count = _attribute(parts[2], "i", what)
    if not nonce.startswith(client_nonce) or len(nonce) <= len(client_nonce):
        raise ScramError("the server's nonce does not extend the client's")
    salt = _base64(salt_text, "salt")
    if not salt:
        raise ScramError("the salt is empty")
    if not count.isdigit() or len(count) > 10:
        raise ScramError("the iteration count is not a number")
    iterations = int(count)
    if iterations < MIN_ITERATIONS:
        raise ScramError(f"the iteration count {iterations} is below {MIN_ITERATIONS}")
    if iterations > MAX_ITERATIONS:
        raise ScramError(f"the iteration count {iterations} is above {MAX_ITERATIONS}")
    return ServerFirst(nonce=nonce, salt=salt, iterations=iterations)


def parse_server_final(message: bytes) -> bytes:
    """Return the server signature (v=) of a server-final-message (RFC 5802 section 7)."""
    what = "server-final-message"
    first = _text(message, what).split(",")[0]
    if first.startswith("e="):
        # Section 7: server-error; the value is a fixed token such as "invalid-proof".
        raise ScramError(f"the server ended the exchange: {first[2:][:64]}")
    signature = _base64(_attribute(first, "v", what), "server signature")
    if len(signature) != hashlib.sha256().digest_size:
        raise ScramError("the server signature has the wrong length")
    return signature


class ScramClient:
    """One client exchange: first_message, then final_message, then verify.

    Keeps the prepared password only until the server's salt arrives, and
    afterwards only the expected server signature.
    """

    def __init__(self, password: str, *, username: str = "", nonce: str | None = None) -> None:
        """Start an exchange; username is empty for PostgreSQL, nonce random unless given."""
        self._password: bytes | None = prepare_password(password)
        self._nonce = client_nonce() if nonce is None else nonce
        if not self._nonce or not self._nonce.isprintable() or "," in self._nonce:
            raise ScramError("a client nonce is printable and has no commas")
        self._first_bare = f"n={_escape_username(username)},r={self._nonce}"
        self._expected: bytes | None = None
        self._step = 0

    def __repr__(self) -> str:
        """Name the step, never the secret material."""
        return f"ScramClient(step={self._step})"

    @property
    def done(self) -> bool:
        """True once the server's signature has been verified."""
        return self._step == 3

    def first_message(self) -> bytes:
        """The client-first-message: gs2 header, username, client nonce."""
        if self._step != 0:
            raise ScramError("client-first-message was already sent")
        self._step = 1
        return f"{GS2_HEADER}{self._first_bare}".encode("ascii")

    def final_message(self, server_first: bytes) -> bytes:
        """The client-final-message answering server_first (slow: runs PBKDF2)."""
        if self._step != 1 or self._password is None:
            raise ScramError("server-first-message arrived out of order")
        self._step = 2
        parsed = parse_server_first(server_first, self._nonce)
        without_proof = f"c={CHANNEL_BINDING},r={parsed.nonce}"
        auth_message = ",".join(
            (self._first_bare, server_first.decode("ascii"), without_proof)
        ).encode("ascii")
        salted = salted_password(self._password, parsed.salt, parsed.iterations)
        self._password = None
        self._expected = server_signature(salted, auth_message)
        proof = base64.b64encode(client_proof(salted, auth_message)).decode("ascii")
        return f"{without_proof},p={proof}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        """Check the server's signature: ScramError unless the server knows the verifier."""
        if self._step != 2 or self._expected is None:
            raise ScramError("server-final-message arrived out of order")
        signature = parse_server_final(server_final)
        if not hmac.compare_digest(signature, self._expected):
            raise ScramError("the server's signature is wrong: it does not know the verifier")
        self._step = 3
