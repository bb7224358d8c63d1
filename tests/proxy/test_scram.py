"""The SCRAM-SHA-256 client: RFC 7677's test vector, SASLprep, and malformed server messages."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jitgate.proxy import scram

# RFC 7677 section 3, the SCRAM-SHA-256 example.
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
SALT = "W22ZaJ0SNY7soEsUEjb6gQ=="


def rfc_client() -> scram.ScramClient:
    return scram.ScramClient("pencil", username="user", nonce=RFC_CLIENT_NONCE)


def at_server_first(nonce: str = "client") -> scram.ScramClient:
    client = scram.ScramClient("pencil", nonce=nonce)
    client.first_message()
    return client


def test_the_rfc_7677_exchange() -> None:
    client = rfc_client()
    assert client.first_message() == RFC_CLIENT_FIRST
    assert client.final_message(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not client.done
    client.verify(RFC_SERVER_FINAL)
    assert client.done


def test_a_wrong_server_signature_fails_the_exchange() -> None:
    client = rfc_client()
    client.first_message()
    client.final_message(RFC_SERVER_FIRST)
    forged = base64.b64encode(bytes(32)).decode()
    with pytest.raises(scram.ScramError, match="signature is wrong"):
        client.verify(f"v={forged}".encode())
    assert not client.done


def test_postgresql_form_has_no_username_and_a_fresh_18_byte_nonce() -> None:
    first = scram.ScramClient("pencil").first_message().decode()
    header, bare = first[:3], first[3:]
    assert header == "n,,"
    assert bare.startswith("n=,r=")
    nonce = bare.removeprefix("n=,r=")
    assert len(base64.b64decode(nonce, validate=True)) == scram.NONCE_BYTES
    assert "," not in nonce
    assert scram.ScramClient("pencil").first_message() != first.encode()


def test_the_username_is_escaped() -> None:
    first = scram.ScramClient("x", username="a=b,c", nonce="n").first_message()
    assert first == b"n,,n=a=3Db=2Cc,r=n"


def test_the_repr_shows_no_secret() -> None:
    client = rfc_client()
    client.first_message()
    client.final_message(RFC_SERVER_FIRST)
    assert "pencil" not in repr(client)
    assert "step=2" in repr(client)


@pytest.mark.parametrize(
    ("server_first", "reason"),
    [
        (b"r=client-server,s=" + SALT.encode() + b",i=4095", "below 4096"),
        (b"r=client-server,s=" + SALT.encode() + b",i=0", "below 4096"),
        (b"r=client-server,s=" + SALT.encode() + b",i=99999999", "above"),
        (b"r=client-server,s=" + SALT.encode() + b",i=-4096", "not a number"),
        (b"r=client-server,s=" + SALT.encode() + b",i=4096x", "not a number"),
        (b"r=client-server,s=" + SALT.encode() + b",i=", "not a number"),
        (b"r=other-server,s=" + SALT.encode() + b",i=4096", "does not extend"),
        (b"r=client,s=" + SALT.encode() + b",i=4096", "does not extend"),
        (b"r=clien,s=" + SALT.encode() + b",i=4096", "does not extend"),
        (b"r=client-server,s=not base64!,i=4096", "base64"),
        (b"r=client-server,s=,i=4096", "salt is empty"),
        (b"r=client-server,i=4096,s=" + SALT.encode(), "no s="),
        (b"s=" + SALT.encode() + b",r=client-server,i=4096", "no r="),
        (b"r=client-server,s=" + SALT.encode(), "malformed"),
        (b"", "malformed"),
        (b"m=ext,r=client-server,s=" + SALT.encode() + b",i=4096", "extension"),
        (b"r=client-server\xff,s=" + SALT.encode() + b",i=4096", "not ASCII"),
        (b"r=client-server\n,s=" + SALT.encode() + b",i=4096", "control"),
        (b"r=client-" + b"x" * 5000 + b",s=" + SALT.encode() + b",i=4096", "bytes long"),
    ],
)
def test_malformed_or_unsafe_server_first_messages_are_refused(
    server_first: bytes, reason: str
) -> None:
    with pytest.raises(scram.ScramError, match=reason):
        at_server_first().final_message(server_first)


def test_server_first_may_carry_extensions_after_the_count() -> None:
    final = at_server_first().final_message(b"r=client-server,s=" + SALT.encode() + b",i=4096,x=1")
    assert final.startswith(b"c=biws,r=client-server,p=")


@pytest.mark.parametrize(
    ("server_final", "reason"),
    [
        (b"e=invalid-proof", "ended the exchange: invalid-proof"),
        (b"v=not base64!", "base64"),
        (b"v=" + base64.b64encode(bytes(16)), "wrong length"),
        (b"x=1", "no v="),
        (b"", "no v="),
    ],
)
def test_malformed_server_final_messages_are_refused(server_final: bytes, reason: str) -> None:
    client = rfc_client()
    client.first_message()
    client.final_message(RFC_SERVER_FIRST)
    with pytest.raises(scram.ScramError, match=reason):
        client.verify(server_final)


def test_steps_out_of_order_are_refused() -> None:
    client = rfc_client()
    with pytest.raises(scram.ScramError, match="out of order"):
        client.final_message(RFC_SERVER_FIRST)
    with pytest.raises(scram.ScramError, match="out of order"):
        client.verify(RFC_SERVER_FINAL)
    client.first_message()
    with pytest.raises(scram.ScramError, match="already sent"):
        client.first_message()
    client.final_message(RFC_SERVER_FIRST)
    with pytest.raises(scram.ScramError, match="out of order"):
        client.final_message(RFC_SERVER_FIRST)


def test_a_nonce_with_a_comma_is_refused() -> None:
    with pytest.raises(scram.ScramError, match="commas"):
        scram.ScramClient("x", nonce="a,b")


@pytest.mark.parametrize(
    ("text", "prepared"),
    [
        # RFC 4013 section 3, the examples.
        ("I\u00adX", "IX"),  # soft hyphen mapped to nothing
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),  # NFKC
        ("\u2168", "IX"),  # NFKC
        ("a\u00a0b", "a b"),  # non-ASCII space to SPACE
        ("\u0627\u0628", "\u0627\u0628"),  # right-to-left text on its own
    ],
)
def test_saslprep_maps_and_normalizes(text: str, prepared: str) -> None:
    assert scram.saslprep(text) == prepared


@pytest.mark.parametrize(
    "text",
    [
        "\u0007",  # RFC 4013 section 3: prohibited (C.2.1)
        "\u0627\u0031",  # RFC 4013 section 3: bidi, RandALCat not last
        "a\u0627",  # mixed left-to-right and right-to-left
        "\u00ad",  # maps to nothing
        "pw\u200e",  # C.8, a left-to-right mark
        "pw\U0001f600",  # unassigned in Unicode 3.2 (A.1)
        "pw\ue000",  # private use, C.3
    ],
)
def test_saslprep_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="SASLprep"):
        scram.saslprep(text)


def test_passwords_are_prepared_like_postgresql() -> None:
    # ASCII: as it is, control characters included (pg_saslprep's fast path).
    assert scram.prepare_password("pen\tcil") == b"pen\tcil"
    # Non-ASCII that SASLprep accepts: its output.
    assert scram.prepare_password("I\u00adX\u2168") == b"IXIX"
    # Non-ASCII that SASLprep refuses: the raw UTF-8, as PostgreSQL falls back to.
    assert scram.prepare_password("pw\U0001f600") == "pw\U0001f600".encode()


def test_an_unencodable_password_fails_without_echoing_it() -> None:
    with pytest.raises(scram.ScramError) as caught:
        scram.ScramClient("secret\udcff")
    assert "secret" not in str(caught.value)


def _server_answers(password: str, client: scram.ScramClient, salt: bytes, iterations: int) -> bool:
    """A server written from RFC 5802 section 3 alone: does it accept the client's proof?"""
    first_bare = client.first_message()[3:].decode()
    client_nonce = first_bare.split("r=", 1)[1]
    server_first = (
        f"r={client_nonce}server,s={base64.b64encode(salt).decode()},i={iterations}".encode()
    )
    final = client.final_message(server_first).decode()
    without_proof, proof_text = final.rsplit(",p=", 1)
    auth = f"{first_bare},{server_first.decode()},{without_proof}".encode()
    salted = hashlib.pbkdf2_hmac("sha256", scram.prepare_password(password), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    signature = hmac.digest(stored_key, auth, "sha256")
    proof = base64.b64decode(proof_text)
    recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
    if hashlib.sha256(recovered).digest() != stored_key:
        return False
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    client.verify(b"v=" + base64.b64encode(hmac.digest(server_key, auth, "sha256")))
    return client.done


@settings(max_examples=25, deadline=None)
@given(
    password=st.text(min_size=1, max_size=40),
    salt=st.binary(min_size=1, max_size=32),
    iterations=st.integers(min_value=4096, max_value=5000),
)
def test_an_independent_server_accepts_the_proof_and_is_accepted(
    password: str, salt: bytes, iterations: int
) -> None:
    assert _server_answers(password, scram.ScramClient(password), salt, iterations)


def test_the_salted_password_is_computed_once_per_salt() -> None:
    # RFC 5802 section 5.1: a client may cache SaltedPassword; a new salt
    # (a changed password) must miss the cache.
    scram.salted_password.cache_clear()
    first = scram.salted_password(b"pencil", b"salt-one", 4096)
    assert scram.salted_password(b"pencil", b"salt-one", 4096) == first
    assert scram.salted_password.cache_info().hits == 1
    assert scram.salted_password(b"pencil", b"salt-two", 4096) != first
    assert scram.salted_password.cache_info().misses == 2
