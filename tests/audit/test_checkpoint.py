"""Signed checkpoints follow C2SP signed-note and tlog-checkpoint, byte for byte."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.audit import checkpoint as cpmod
from jitgate.audit.checkpoint import (
    MAX_NOTE_BYTES,
    MAX_SIGNATURES,
    BadSignature,
    Checkpoint,
    CheckpointError,
    InvalidKey,
    MalformedCheckpoint,
    MalformedNote,
    NoteSigner,
    NoteVerifier,
    UnknownKey,
    load_signer,
    load_verifiers,
    open_note,
    open_signed,
    parse_verifier_key,
    sign_note,
    verifier_key_string,
)
from jitgate.common.errors import ConfigError
from jitgate.common.keys import write_private, write_public

DASH = "\u2014"


def go_signer(skey: str) -> NoteSigner:
    """A signer from sumdb/note's "PRIVATE+KEY+<name>+<hash>+base64(0x01 || seed)"."""
    _, _, name, _, data = skey.split("+", 4)
    seed = base64.b64decode(data)
    assert seed[0] == 1
    return NoteSigner(name, Ed25519PrivateKey.from_private_bytes(seed[1:]))


# Known answers from golang.org/x/mod/sumdb/note (note.go's package example,
# note_test.go's TestSign, TestOpen and TestNewVerifier).
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
PETER_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
PETER_SIG = (
    f"{DASH} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAc"
    "ElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)
ENOCH_SIG = (
    f"{DASH} EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/"
    "5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"
)

# A real sum.golang.org checkpoint with its published verifier key, and three
# witness cosignatures over it (transparency-dev/formats log/note_test.go).
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = (
    "go.sum database tree\n"
    "6476701\n"
    "mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n"
    "\n"
    f"{DASH} sum.golang.org Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949r"
    "j4nPRYfvimWEPWL+o3GeoWwOoAw=\n"
)
WITNESSES = {
    "monkeys+db4d9f7e+AULaJMvTtDLHPUcUrjdDad9vDlh/PTfC2VV60JUtCfWT": (
        f"{DASH} monkeys 202ffh9ve46Mqbhuyb4wnC2Pwdan5EsXQym/tF1ggXJqhjGosU4T5intH4iKMRgDLxrn"
        "XuIjRaU2NbvAnaepM6Y+8ww=\n"
    ),
    "bananas+cf639f13+AaPjhFnPCQnid/Ql32KWhmh+uk72FVRfK+2DLmO3BI3M": (
        f"{DASH} bananas z2OfE+2bbsBZ7NLgfuslc0v7NFW2QyexJ7fhePpoL2N/P7N/COd5S+JNHbQEAlYzz2C5"
        "sg0E+x/MggS1mDR6t3/9rQw=\n"
    ),
    "witness+f13a86db+AdYV1Ztajd9BvyjP2HgpwrqYL6TjOwIjGMOq8Bu42xbN": (
        f"{DASH} witness 8TqG25yWGFLdT7WPf/WoyeG3LwqtkXP+8S3yykOVm6EMh4hPgCke6eSVPU4BdtXNMPJB"
        "XKF+UpDbGgCdcpR8SVSoqAU=\n"
    ),
}
# Signer and verifier key pairs from transparency-dev/formats log/note_test.go.
GO_KEY_PAIRS = [
    (
        "PRIVATE+KEY+Log+2271c621+AdEIq9FLRQni54Wg68T96VJO+iayOaulswav2DUMKgvQ",
        "Log+2271c621+AemuH5ooBpEPcr+W8onrjA1NfuzBVHdezakU81Ekarvs",
    ),
    (
        "PRIVATE+KEY+Known+451c786d+AQPRoE2+Z+Ed1HaHBA9F/FfracvcZ2rDU39kCecMEoci",
        "Known+451c786d+AXAQ0T7lbwuY4ABJ9/MYY9bWV3hmSyOGVt2x42NkmdUH",
    ),
    (
        "PRIVATE+KEY+KnownAgain+4893b26c+ARhZda/l25zjGZswYLDZsLNRzNpmv5wYTN9IoTr1OJ2+",
        "KnownAgain+4893b26c+AQ+LR7BFF/F/dkpIBjBpSvT0crkteizuUkavAoGeaYMj",
    ),
    (
        "PRIVATE+KEY+Unknown+fdbb2e08+Aav2knTC6orbhXX8pMWuNiWgO+Wwk2DB+h1eU2Q1W1nU",
        "Unknown+fdbb2e08+AWgRIYZ+8x1Vl+1Q+sR8zciNHiYI1SdlBjNw+RV0rots",
    ),
]

# This project's own fixed vector: a two-leaf RFC 6962 tree signed by a fixed key.
NAME = "audit.jitgate.example/log"
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"jitgate checkpoint test key").digest())
LEAF_A, LEAF_B = (hashlib.sha256(b"\x00" + leaf).digest() for leaf in (b"a", b"b"))
ROOT = hashlib.sha256(b"\x01" + LEAF_A + LEAF_B).digest()
CHECKPOINT = Checkpoint(NAME, 2, ROOT)
VKEY = "audit.jitgate.example/log+afb5cfc1+AcvcNxmPbKMRgBpbaS9b7yafP/S88FVlGpQYofPIZVuO"
NOTE = (
    "audit.jitgate.example/log\n"
    "2\n"
    "sTeYX/SE+2ANuTEHx3sDZcgNePW0Kd7Q/Zc2HQd5mes=\n"
    "\n"
    f"{DASH} audit.jitgate.example/log r7XPwcZhSI+hSOGXqeMVAkJVKYXLr4pw4qfnrUYQSngJJwmtH24Du+0E"
    "wh4yfIFE0NNxwcpub24PddWtO10wfl5kJAc=\n"
)
SIGNER = NoteSigner(NAME, KEY)
VERIFIER = SIGNER.verifier
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"another key").digest())


def body_and_sig(note: str) -> tuple[str, str]:
    text, sig = note.split("\n\n")
    return text + "\n", sig


# Known answers.


def test_sumdb_note_signature_is_byte_exact() -> None:
    signer = go_signer(PETER_SKEY)
    assert f"{signer.key_id:08x}" == "c74f20a3"
    assert sign_note(PETER_TEXT, signer) == PETER_TEXT + "\n" + PETER_SIG
    assert verifier_key_string("PeterNeumann", signer.private_key.public_key()) == PETER_VKEY


def test_sumdb_note_opens_with_its_published_key() -> None:
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    assert open_note(PETER_TEXT + "\n" + PETER_SIG, [peter]) == PETER_TEXT
    both = PETER_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(both, [peter]) == PETER_TEXT  # Enoch's signature is ignored, not refused.
    assert open_note(both, [peter, enoch]) == PETER_TEXT
    assert open_note(both, [enoch]) == PETER_TEXT
    with pytest.raises(UnknownKey):
        open_note(both, [])
    # TestOpen's "Invalid signature": four base64 characters spliced in.
    with pytest.raises(BadSignature, match="PeterNeumann\\+c74f20a3"):
        open_note(PETER_TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:], [peter])


@pytest.mark.parametrize(
    "note",
    [
        PETER_TEXT,
        PETER_TEXT + "\n",
        PETER_TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + PETER_TEXT + "\n" + PETER_SIG,
        b"\xff" + (PETER_TEXT + "\n" + PETER_SIG).encode(),
        PETER_TEXT + "\n" + f"{DASH} Bad Name " + PETER_SIG.split(" ")[2],
        PETER_TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
        PETER_TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1),
    ],
)
def test_sumdb_malformed_notes_are_malformed(note: str | bytes) -> None:
    # TestOpen's badMsgs, plus its "too many signatures".
    with pytest.raises(MalformedNote):
        open_note(note, [parse_verifier_key(PETER_VKEY)])


def test_sumdb_checkpoint_opens_with_witness_cosignatures() -> None:
    log = parse_verifier_key(SUMDB_VKEY)
    checkpoint = open_signed(SUMDB_NOTE, [log])
    assert checkpoint == Checkpoint(
        "go.sum database tree",
        6476701,
        base64.b64decode("mb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk="),
    )
    witnesses = [parse_verifier_key(vkey) for vkey in WITNESSES]
    cosigned = SUMDB_NOTE + "".join(WITNESSES.values())
    assert open_signed(cosigned, [log, *witnesses]) == checkpoint
    for witness, line in zip(witnesses, WITNESSES.values(), strict=True):
        assert open_signed(SUMDB_NOTE + line, [witness]) == checkpoint


@pytest.mark.parametrize(("skey", "vkey"), GO_KEY_PAIRS)
def test_verifier_key_strings_match_go(skey: str, vkey: str) -> None:
    signer = go_signer(skey)
    assert verifier_key_string(signer.name, signer.private_key.public_key()) == vkey
    assert parse_verifier_key(vkey) == signer.verifier


def test_tree_text_matches_go_tlog() -> None:
    # sumdb/tlog note_test.go TestFormatTree: RecordHash is the RFC 6962 leaf hash.
    golden = "go.sum database tree\n123456789012\nTszzRgjTG6xce+z2AG31kAXYKBgQVtCSCE40HmuwBb0=\n"
    leaf = hashlib.sha256(b"\x00hello world").digest()
    assert Checkpoint("go.sum database tree", 123456789012, leaf).to_text() == golden
    assert Checkpoint.parse(golden) == Checkpoint("go.sum database tree", 123456789012, leaf)


# This project's checkpoints.


def test_fixed_key_and_checkpoint_give_exact_bytes() -> None:
    assert SIGNER.sign(CHECKPOINT) == NOTE
    assert verifier_key_string(NAME, KEY.public_key()) == VKEY
    assert open_signed(NOTE, [parse_verifier_key(VKEY)]) == CHECKPOINT
    assert open_signed(NOTE.encode(), [VERIFIER]) == CHECKPOINT


def test_round_trip_with_extensions() -> None:
    checkpoint = Checkpoint("example.com/log42", 0, hashlib.sha256().digest(), ("ext one", "2"))
    text = checkpoint.to_text()
    root = base64.b64encode(checkpoint.root).decode()
    assert text == f"example.com/log42\n0\n{root}\next one\n2\n"
    assert Checkpoint.parse(text) == checkpoint
    assert open_signed(SIGNER.sign(checkpoint), [VERIFIER]) == checkpoint


origins = st.text(
    st.characters(blacklist_categories=["Cs"], min_codepoint=0x20), min_size=1, max_size=40
)


@given(
    origin=origins,
    size=st.integers(0, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(origins, max_size=3).map(tuple),
)
def test_round_trip_any_checkpoint(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    checkpoint = Checkpoint(origin, size, root, extensions)
    assert Checkpoint.parse(checkpoint.to_text()) == checkpoint
    assert open_signed(SIGNER.sign(checkpoint), [VERIFIER]) == checkpoint


@given(st.text(max_size=200))
def test_parse_is_strict_and_canonical(text: str) -> None:
    # Whatever parses writes back to exactly the same text.
    try:
        checkpoint = Checkpoint.parse(text)
    except MalformedCheckpoint:
        return
    assert checkpoint.to_text() == text


# Tampering.


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (0, "audit.jitgate.example/log2"),
        (1, "3"),
        (2, base64.b64encode(LEAF_A).decode()),
    ],
)
def test_altered_body_line_is_a_bad_signature(line: int, value: str) -> None:
    text, sig = body_and_sig(NOTE)
    lines = text.splitlines()
    lines[line] = value
    with pytest.raises(BadSignature):
        open_signed("\n".join(lines) + "\n\n" + sig, [VERIFIER])


def test_added_or_altered_extension_is_a_bad_signature() -> None:
    note = SIGNER.sign(Checkpoint(NAME, 2, ROOT, ("ext",)))
    text, sig = body_and_sig(note)
    for forged in (text.replace("ext", "ext2"), text.replace("ext\n", ""), text + "more\n"):
        with pytest.raises(BadSignature):
            open_signed(forged + "\n" + sig, [VERIFIER])
    _, plain_sig = body_and_sig(NOTE)
    with pytest.raises(BadSignature):
        open_signed(CHECKPOINT.to_text() + "ext\n\n" + plain_sig, [VERIFIER])


def test_altered_signature_is_a_bad_signature() -> None:
    text, sig = body_and_sig(NOTE)
    prefix, encoded = sig.rstrip("\n").rsplit(" ", 1)
    blob = bytearray(base64.b64decode(encoded))
    for index in (4, 30, 67):  # Ed25519 R, inside, last byte of S; the key ID is kept.
        blob[index] ^= 0x01
        forged = f"{prefix} {base64.b64encode(bytes(blob)).decode()}\n"
        blob[index] ^= 0x01
        with pytest.raises(BadSignature):
            open_signed(text + "\n" + forged, [VERIFIER])
    short = f"{prefix} {base64.b64encode(bytes(blob[:40])).decode()}\n"
    with pytest.raises(BadSignature):
        open_signed(text + "\n" + short, [VERIFIER])


def test_wrong_key_is_unknown() -> None:
    with pytest.raises(UnknownKey, match="no signature by a known key"):
        open_signed(NOTE, [NoteVerifier(NAME, OTHER_KEY.public_key())])
    with pytest.raises(UnknownKey):
        open_signed(NOTE, [])


def test_unknown_key_name_is_unknown() -> None:
    renamed = NOTE.replace(f"{DASH} {NAME} ", f"{DASH} someone.else/log ")
    with pytest.raises(UnknownKey):
        open_signed(renamed, [VERIFIER])
    # signed-note "Signatures": same key ID, different name, is a different key.
    impostor = NoteVerifier("someone.else/log", KEY.public_key())
    with pytest.raises(UnknownKey):
        open_signed(NOTE, [impostor])


def test_key_id_collision_with_a_different_name_is_ignored() -> None:
    # A signature line bearing the known key's ID under another name is not that key's.
    other = NoteSigner("other.example/log", OTHER_KEY)
    text, sig = body_and_sig(other.sign(CHECKPOINT))
    encoded = base64.b64decode(sig.rstrip("\n").rsplit(" ", 1)[1])
    colliding = VERIFIER.key_id.to_bytes(4, "big") + encoded[4:]
    line = f"{DASH} other.example/log {base64.b64encode(colliding).decode()}\n"
    with pytest.raises(UnknownKey):
        open_signed(text + "\n" + line, [VERIFIER])
    # ...and it does not spoil a good signature by the known key beside it.
    assert open_signed(NOTE + line, [VERIFIER]) == CHECKPOINT


def test_name_and_key_id_collision_is_a_bad_signature() -> None:
    # An attacker's key claiming the known name and ID fails against the pinned key.
    other = NoteSigner(NAME, OTHER_KEY)
    text, sig = body_and_sig(other.sign(CHECKPOINT))
    encoded = base64.b64decode(sig.rstrip("\n").rsplit(" ", 1)[1])
    forged = VERIFIER.key_id.to_bytes(4, "big") + encoded[4:]
    with pytest.raises(BadSignature):
        open_signed(f"{text}\n{DASH} {NAME} {base64.b64encode(forged).decode()}\n", [VERIFIER])


def test_unknown_signatures_are_ignored_but_a_bad_known_one_rejects_the_note() -> None:
    stranger = NoteSigner("stranger.example", OTHER_KEY)
    both = sign_note(CHECKPOINT.to_text(), SIGNER, stranger)
    assert open_signed(both, [VERIFIER]) == CHECKPOINT
    assert open_signed(both, [stranger.verifier]) == CHECKPOINT
    text, sigs = body_and_sig(both)
    good, bad = sigs.splitlines()
    bad = bad[:-8] + ("AAAAAAA=" if not bad.endswith("AAAAAAA=") else "BBBBBBB=")
    note = f"{text}\n{good}\n{bad}\n"
    assert open_signed(note, [VERIFIER]) == CHECKPOINT
    with pytest.raises(BadSignature, match=r"stranger\.example\+"):
        open_signed(note, [VERIFIER, stranger.verifier])


def test_conflicting_verifiers_are_refused() -> None:
    twin = NoteVerifier(NAME, OTHER_KEY.public_key())
    object.__setattr__(twin, "key_id", VERIFIER.key_id)  # As a forged key list would.
    with pytest.raises(InvalidKey, match="two verifier keys"):
        open_signed(NOTE, [VERIFIER, twin])
    assert open_signed(NOTE, [VERIFIER, parse_verifier_key(VKEY)]) == CHECKPOINT


# Malformed notes.

_TEXT, _SIG = body_and_sig(NOTE)


@pytest.mark.parametrize(
    ("note", "reason"),
    [
        (NOTE[:-1], "does not end in a newline"),
        (_TEXT + _SIG, "no blank line"),
        (_TEXT + "\n\n" + _SIG, "line 4 is empty"),
        (_TEXT + "\n" + _SIG + "\n", "no signature lines"),
        (_TEXT + "\n" + _SIG + "\n" + _SIG, "line 4 is empty"),
        ("\n" + NOTE, "line 1 is empty"),
        (NOTE.replace("\n", "\r\n"), "CRLF"),
        (NOTE.replace("2\n", "2\r\n", 1), "CRLF"),
        (NOTE.replace("log\n2", "log\t\n2", 1), "U\\+0009"),
        (_TEXT + "\n" + _SIG.replace(DASH, "-"), "em dash"),
        (_TEXT + "\n" + _SIG.replace(DASH, "\u2013"), "em dash"),
        (_TEXT + "\n" + _SIG.replace(DASH + " ", DASH), "em dash"),
        (_TEXT + "\n" + " " + _SIG, "em dash"),
        (_TEXT + "\n" + _SIG.replace(f" {NAME} ", f" {NAME}  "), "not base64"),
        (_TEXT + "\n" + _SIG.replace(f" {NAME} ", "  "), "key name ''"),
        (_TEXT + "\n" + _SIG.replace(f" {NAME} ", " a+b "), "contains '\\+'"),
        (_TEXT + "\n" + _SIG.replace(f" {NAME} ", " a\u00a0b "), "space"),
        (_TEXT + "\n" + _SIG.replace("=\n", "\n"), "not base64"),
        (_TEXT + "\n" + _SIG.replace("+", "-").replace(NAME, "a"), "not base64"),
        (_TEXT + "\n" + _SIG.replace("=\n", "= \n"), "not base64"),
        (_TEXT + "\n" + f"{DASH} {NAME} AAAAAA==\n", "not base64 of key ID and signature"),
        (_TEXT + "\n" + f"{DASH} {NAME}\n", "not base64"),
    ],
)
def test_malformed_note_is_rejected(note: str, reason: str) -> None:
    with pytest.raises(MalformedNote, match=reason):
        open_signed(note, [VERIFIER])


@pytest.mark.parametrize(
    ("size", "reason"),
    [
        ("02", "leading zeros"),
        ("00", "leading zeros"),
        ("-2", "not a decimal"),
        ("+2", "not a decimal"),
        ("0x2", "not a decimal"),
        ("2.0", "not a decimal"),
        ("1_0", "not a decimal"),
        (" 2", "not a decimal"),
        ("\u0662", "not a decimal"),  # ARABIC-INDIC DIGIT TWO, which int() would accept.
        ("18446744073709551616", "64 bits"),
        ("1" * 5000, "64 bits"),
    ],
)
def test_bad_tree_size_is_malformed(size: str, reason: str) -> None:
    with pytest.raises(MalformedCheckpoint, match=reason):
        open_signed(NOTE.replace("\n2\n", f"\n{size}\n", 1), [VERIFIER])


def test_largest_tree_size_parses() -> None:
    text = f"{NAME}\n18446744073709551615\n{base64.b64encode(ROOT).decode()}\n"
    assert Checkpoint.parse(text).size == 2**64 - 1


@pytest.mark.parametrize(
    ("root", "reason"),
    [
        (base64.b64encode(ROOT[:31]).decode(), "31 bytes, not 32"),
        (base64.b64encode(ROOT + b"\x00").decode(), "33 bytes, not 32"),
        (base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not canonical standard base64"),
        (base64.b64encode(ROOT).decode().rstrip("="), "not canonical standard base64"),
        (base64.b64encode(ROOT).decode()[:-2] + "n=", "not canonical standard base64"),
        ("!" + base64.b64encode(ROOT).decode()[1:], "not canonical standard base64"),
        ("", "line 3 is empty"),
    ],
)
def test_bad_root_is_malformed(root: str, reason: str) -> None:
    note = NOTE.replace(base64.b64encode(ROOT).decode(), root)
    with pytest.raises(MalformedCheckpoint, match=reason):
        open_signed(note, [VERIFIER])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        f"{NAME}\n2\n",
        f"{NAME}\n2\n{base64.b64encode(ROOT).decode()}",
        f"{NAME}\n2\n{base64.b64encode(ROOT).decode()}\n\n",
        f"{NAME}\n2\n{base64.b64encode(ROOT).decode()}\n\next\n",
        f"{NAME}\n2\n{base64.b64encode(ROOT).decode()}\r\n",
    ],
)
def test_bad_checkpoint_text_is_malformed(text: str) -> None:
    with pytest.raises(MalformedCheckpoint):
        Checkpoint.parse(text)


@pytest.mark.parametrize(
    "fields",
    [
        ("", 1, ROOT),
        ("a\nb", 1, ROOT),
        ("a\rb", 1, ROOT),
        ("a\ud800", 1, ROOT),
        (NAME, -1, ROOT),
        (NAME, 2**64, ROOT),
        (NAME, True, ROOT),
        (NAME, 1, ROOT[:31]),
        (NAME, 1, ROOT.hex()),
        (NAME, 1, ROOT, ("",)),
        (NAME, 1, ROOT, ("a\nb",)),
    ],
)
def test_invalid_checkpoint_cannot_be_built(fields: tuple[object, ...]) -> None:
    with pytest.raises(MalformedCheckpoint):
        Checkpoint(*fields)  # type: ignore[arg-type]


# Bounds, checked before any signature is.


@pytest.fixture
def no_crypto(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: NoteVerifier, message: bytes, signature: bytes) -> bool:
        raise AssertionError("a signature was checked")

    monkeypatch.setattr(NoteVerifier, "verify", refuse)


def test_hundred_signatures_open_and_a_hundred_and_first_is_refused() -> None:
    full = sign_note(CHECKPOINT.to_text(), *[SIGNER] * MAX_SIGNATURES)
    assert len(full.encode()) <= MAX_NOTE_BYTES
    assert open_signed(full, [VERIFIER]) == CHECKPOINT
    with pytest.raises(MalformedNote):
        sign_note(CHECKPOINT.to_text(), *[SIGNER] * (MAX_SIGNATURES + 1))


@pytest.mark.usefixtures("no_crypto")
def test_too_many_signatures_are_refused_before_crypto() -> None:
    text, sig = body_and_sig(NOTE)
    note = text + "\n" + sig * (MAX_SIGNATURES + 1)
    assert len(note.encode()) <= MAX_NOTE_BYTES
    with pytest.raises(MalformedNote, match="101 signatures"):
        open_signed(note, [VERIFIER])


def _note_of_size(total: int) -> str:
    """A validly signed note of exactly total bytes, padded by an extension line."""
    base = len(SIGNER.sign(Checkpoint(NAME, 2, ROOT, ("x",))).encode())
    return SIGNER.sign(Checkpoint(NAME, 2, ROOT, ("x" * (1 + total - base),)))


def test_note_at_the_size_limit_opens() -> None:
    note = _note_of_size(MAX_NOTE_BYTES)
    assert len(note.encode()) == MAX_NOTE_BYTES
    assert open_signed(note, [VERIFIER]).extensions[0].startswith("xxx")


@pytest.mark.usefixtures("no_crypto")
def test_oversize_note_is_refused_before_crypto() -> None:
    text, sig = body_and_sig(_note_of_size(MAX_NOTE_BYTES))
    note = text.replace("xxx", "xxxx", 1) + "\n" + sig
    assert len(note.encode()) == MAX_NOTE_BYTES + 1
    for form in (note, note.encode()):
        with pytest.raises(MalformedNote, match="over"):
            open_signed(form, [VERIFIER])
    # Multi-byte characters count as the bytes they take.
    wide = "\u00e9" * (MAX_NOTE_BYTES // 2 + 1)
    with pytest.raises(MalformedNote, match="over"):
        open_signed(wide, [VERIFIER])
    with pytest.raises(MalformedNote):
        sign_note(f"{NAME}\n2\n{'x' * MAX_NOTE_BYTES}\n", SIGNER)


@pytest.mark.usefixtures("no_crypto")
@pytest.mark.parametrize(
    "note",
    [
        NOTE.encode().replace(b"log\n2", b"log\xff\n2"),
        NOTE.encode().replace(b"log\n2", b"log\xc3\n2"),
        NOTE.encode().replace(b"log\n2", b"log\xed\xa0\x80\n2"),  # An encoded surrogate.
        NOTE.encode().replace(DASH.encode(), b"\x97"),  # cp1252's em dash.
        NOTE.replace("log\n2", "log\ud800\n2"),
    ],
)
def test_non_utf8_is_refused_before_crypto(note: str | bytes) -> None:
    with pytest.raises(MalformedNote, match="UTF-8"):
        open_signed(note, [VERIFIER])


# Mutation: no corruption of a signed note verifies, and each fails in a documented way.


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(NOTE.encode()) - 1), st.integers(1, 255)), min_size=1))
def test_byte_flips_never_verify(flips: list[tuple[int, int]]) -> None:
    data = bytearray(NOTE.encode())
    for index, mask in flips:
        data[index] ^= mask
    if bytes(data) == NOTE.encode():
        return  # The flips cancelled out.
    with pytest.raises((MalformedNote, UnknownKey, BadSignature)):
        open_signed(bytes(data), [VERIFIER])


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(NOTE) - 1), st.characters(min_codepoint=0x20, max_codepoint=0x7E))
def test_printable_substitutions_never_verify(index: int, char: str) -> None:
    # Staying valid UTF-8 text, these reach the signature check far more often.
    if NOTE[index] == char:
        return
    with pytest.raises((MalformedNote, UnknownKey, BadSignature)):
        open_signed(NOTE[:index] + char + NOTE[index + 1 :], [VERIFIER])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=200))
def test_arbitrary_input_raises_only_documented_errors(data: str | bytes) -> None:
    with pytest.raises(CheckpointError):
        open_signed(data, [VERIFIER])


# Keys.


@pytest.mark.parametrize(
    "name",
    ["", "a b", "a+b", "a\tb", "a\nb", "a\u00a0b", "a\u2028b", "a\u3000b", "a\x01b", "\ud800"],
)
def test_bad_key_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidKey):
        NoteSigner(name, KEY)
    with pytest.raises(InvalidKey):
        NoteVerifier(name, KEY.public_key())
    with pytest.raises(InvalidKey):
        verifier_key_string(name, KEY.public_key())


def test_every_mangled_verifier_key_is_refused() -> None:
    # sumdb/note TestNewVerifier: every proper substring and every incremented byte.
    vkey = PETER_VKEY
    for start in range(len(vkey) + 1):
        for end in range(start + 1, len(vkey) + 1):
            if (start, end) != (0, len(vkey)):
                with pytest.raises(InvalidKey):
                    parse_verifier_key(vkey[start:end])
    for index in range(len(vkey)):
        mangled = vkey[:index] + chr(ord(vkey[index]) + 1) + vkey[index + 1 :]
        with pytest.raises(InvalidKey):
            parse_verifier_key(mangled)


_SHORT = b"\x01" + bytes(31)  # An Ed25519 key a byte short, with its proper key ID.
SHORT_VKEY = "short+{:08x}+{}".format(
    int.from_bytes(hashlib.sha256(b"short\n" + _SHORT).digest()[:4], "big"),
    base64.b64encode(_SHORT).decode(),
)


@pytest.mark.parametrize(
    ("vkey", "reason"),
    [
        # sumdb/note's wrong-length key: refused here already for its stray padding bits.
        (
            "PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            "base64",
        ),
        (SHORT_VKEY, "31 bytes, not 32"),
        ("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "not Ed25519"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("PeterNeumann+0xc74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8 hex digits"),
        (PETER_VKEY + "\n", "base64"),
        (" " + PETER_VKEY, "name"),
    ],
)
def test_bad_verifier_keys_say_why(vkey: str, reason: str) -> None:
    with pytest.raises(InvalidKey, match=reason):
        parse_verifier_key(vkey)


def test_upper_case_key_id_is_accepted_as_go_does() -> None:
    assert parse_verifier_key(PETER_VKEY.replace("c74f20a3", "C74F20A3")) == parse_verifier_key(
        PETER_VKEY
    )


def test_pem_keys_load_as_signer_and_verifiers(tmp_path: Path) -> None:
    write_private(tmp_path / "log.key", KEY)
    write_public(tmp_path / "one.pub", KEY.public_key())
    write_public(tmp_path / "two.pub", OTHER_KEY.public_key())
    both = tmp_path / "both.pub"
    both.write_bytes((tmp_path / "two.pub").read_bytes() + (tmp_path / "one.pub").read_bytes())
    signer = load_signer(NAME, tmp_path / "log.key")
    assert signer.sign(CHECKPOINT) == NOTE
    verifiers = load_verifiers(NAME, both)
    assert len(verifiers) == 2
    assert open_signed(NOTE, verifiers) == CHECKPOINT
    with pytest.raises(ConfigError):
        load_signer(NAME, tmp_path / "missing.key")
    with pytest.raises(InvalidKey):
        load_verifiers("bad name", both)


def test_signing_refuses_text_that_is_not_a_note() -> None:
    for text in ("no newline", "a\r\n", "a\x00\n", "a\ud800\n"):
        with pytest.raises(MalformedNote):
            sign_note(text, SIGNER)
    with pytest.raises(MalformedNote):
        sign_note("a\n")


def test_errors_are_value_errors_in_three_distinct_families() -> None:
    for error in (MalformedNote, MalformedCheckpoint, InvalidKey, UnknownKey, BadSignature):
        assert issubclass(error, CheckpointError)
        assert issubclass(error, ValueError)
    assert issubclass(MalformedCheckpoint, MalformedNote)
    families = (MalformedNote, UnknownKey, BadSignature)
    for one in families:
        assert [issubclass(one, other) for other in families].count(True) == 1
    assert cpmod.__doc__ is not None
    assert cpmod.__doc__.count("\n") == 0
