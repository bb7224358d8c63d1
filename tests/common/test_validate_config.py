"""Request fields and settings are checked before anything trusts them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from jitgate.common import validate
from jitgate.common.config import Env
from jitgate.common.errors import ConfigError, InvalidArgument
from jitgate.common.redisconn import redacted


@pytest.mark.parametrize("name", ["orders-replica", "a", "db.eu-1_x", "0" * 63])
def test_good_connection_names(name: str) -> None:
    assert validate.connection_name(name) == name


@pytest.mark.parametrize("name", ["", "Orders", "-x", "a b", "a/b", "x" * 64, "é", "a\n"])
def test_bad_connection_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate.connection_name(name)
    assert raised.value.field == "connection"


@pytest.mark.parametrize("grant_id", ["", "xyz", "A" * 32, "0" * 31, "0" * 33])
def test_bad_grant_ids(grant_id: str) -> None:
    with pytest.raises(InvalidArgument):
        validate.grant_id(grant_id)


def test_reasons_are_bounded_and_printable() -> None:
    assert validate.reason("look at slow queries") == "look at slow queries"
    with pytest.raises(InvalidArgument):
        validate.reason("x" * 513)
    with pytest.raises(InvalidArgument):
        validate.reason("line\nbreak")


def test_ttl_bounds() -> None:
    assert validate.ttl_seconds(0) == 0
    with pytest.raises(InvalidArgument):
        validate.ttl_seconds(validate.MAX_TTL_SECONDS + 1)


def test_printable_truncates_and_replaces_controls() -> None:
    assert validate.printable("a\x1bb" + "c" * 10, 5) == "a?bcc"


def test_env_reads_typed_values(tmp_path: Path) -> None:
    env = Env({"A": " 7 ", "D": "2.5s", "L": "x, y,", "P": "127.0.0.1:80", "F": f"{tmp_path}"})
    assert env.integer("A", 1, low=0, high=10) == 7
    assert env.seconds("D", 1.0, low=0, high=10) == 2.5
    assert env.names("L", ()) == ("x", "y")
    assert env.address("P") == "127.0.0.1:80"
    assert env.paths("F") == (tmp_path,)
    assert env.string("MISSING", "default") == "default"


@pytest.mark.parametrize(
    ("environ", "read", "message"),
    [
        ({}, lambda e: e.string("X"), "X is required"),
        ({"X": "ten"}, lambda e: e.integer("X", 1, low=0, high=9), "not an integer"),
        ({"X": "99"}, lambda e: e.integer("X", 1, low=0, high=9), "out of range"),
        ({"X": "soon"}, lambda e: e.seconds("X", 1, low=0, high=9), "not a number"),
        ({"X": "nohost"}, lambda e: e.address("X"), "not host:port"),
        ({"X": "h:99999"}, lambda e: e.address("X"), "not host:port"),
        ({}, lambda e: e.paths("X"), "X is required"),
    ],
)
def test_env_errors_name_the_variable(
    environ: dict[str, str], read: Callable[[Env], object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read(Env(environ))


def test_redis_passwords_are_redacted() -> None:
    assert redacted("redis://issuer:s3cret@127.0.0.1:7448/0") == "redis://issuer@127.0.0.1:7448/0"
    assert redacted("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"
    assert "s3cret" not in redacted("redis://h:1/0?password=s3cret")
    assert "s3cret" not in redacted("rediss://:s3cret@h:1/0")
