"""The PostgreSQL audit store: the SqliteStore's rules, enforced by the server and its roles."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from jitgate.audit.record import StoredRecord
from jitgate.audit.store import (
    APPLICATION_ID,
    Head,
    StoredCheckpoint,
    StoreError,
    check_continues,
    checkpoint_from_row,
    record_from_row,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""1: records and signed checkpoints, written in the same transaction."""
APPLICATION_NAME = "jitgate-audit"
CONNECT_TIMEOUT = 10
"""Seconds to wait for the server before an open fails."""
_MAX_INDEX = 2**63 - 1  # bigint
_LOCK_KEY = APPLICATION_ID
"""The advisory lock held while appending; advisory locks are per database."""
_TABLES = ("audit_meta", "audit_records", "audit_checkpoints")

# Created by the owner (provision), never by the store. Indices come from the
# writer's sequencer, so no column has a sequence or identity default. The
# triggers are ENABLE ALWAYS so they fire even with session_replication_role =
# replica (PostgreSQL docs, sql-altertable: ENABLE ALWAYS TRIGGER). The owner
# can still drop them; the hash chain and the signed checkpoints are what show
# that something was changed.
_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE audit_meta (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        application_id bigint NOT NULL,
        schema_version integer NOT NULL
    )
    """,
    """
    CREATE TABLE audit_records (
        idx bigint PRIMARY KEY CHECK (idx >= 0),
        time text NOT NULL,
        caller text NOT NULL,
        kind text NOT NULL,
        canonical bytea NOT NULL,
        hash bytea NOT NULL CHECK (length(hash) = 32)
    )
    """,
    """
    CREATE TABLE audit_checkpoints (
        size bigint PRIMARY KEY CHECK (size >= 0),
        root bytea NOT NULL CHECK (length(root) = 32),
        time text NOT NULL,
        note text NOT NULL
    )
    """,
    """
    CREATE FUNCTION audit_append_only() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog AS $$
    BEGIN
        RAISE EXCEPTION 'jitgate audit table % is append-only: % refused', TG_TABLE_NAME, TG_OP;
    END
    $$
    """,
    *(
        statement
        for table in _TABLES
        for statement in (
            f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION audit_append_only()",
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}"
            " FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_change",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_truncate",
        )
    ),
)
_INSERT_META = "INSERT INTO audit_meta (application_id, schema_version) VALUES (%s, %s)"
_INSERT = (
    "INSERT INTO audit_records (idx, time, caller, kind, canonical, hash)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)
_SELECT = (
    "SELECT idx, time, caller, kind, canonical, hash FROM audit_records"
    " WHERE idx >= %s ORDER BY idx LIMIT %s"
)
_HEAD = "SELECT idx, hash FROM audit_records ORDER BY idx DESC LIMIT 1"
_INSERT_CHECKPOINT = (
    "INSERT INTO audit_checkpoints (size, root, time, note) VALUES (%s, %s, %s, %s)"
)
_SELECT_CHECKPOINTS = (
    "SELECT size, root, time, note FROM audit_checkpoints WHERE size >= %s ORDER BY size LIMIT %s"
)
_LATEST_CHECKPOINT = (
    "SELECT size, root, time, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1"
)

Connection = psycopg.Connection[tuple[Any, ...]]


class _HeadMoved(Exception):
    """Someone else appended since this store last read the head."""


def describe(dsn: str) -> str:
    """Return where dsn points, for messages: database, host and port, never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "PostgreSQL database (unparsable DSN)"
    where = str(params.get("dbname") or params.get("user") or "?")
    host = params.get("host") or "localhost"
    port = params.get("port")
    return f"PostgreSQL database {where} on {host}{f':{port}' if port else ''}"


def _connect(dsn: str, *, where: str, connect_timeout: int) -> Connection:
    try:
        return psycopg.connect(
            dsn,
            autocommit=True,
            connect_timeout=connect_timeout,
            application_name=APPLICATION_NAME,
        )
    except psycopg.Error as exc:
        raise StoreError(f"cannot open {where}: {exc}") from exc


def _log_state(conn: Connection, where: str) -> bool:
    """Return whether the connected database holds a jitgate audit log; raise if it is another."""
    row = conn.execute("SELECT to_regclass('audit_meta') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return False
    rows = conn.execute("SELECT application_id, schema_version FROM audit_meta").fetchall()
    if len(rows) != 1 or rows[0][0] != APPLICATION_ID:
        raise StoreError(f"{where} is not a jitgate audit log")
    version = rows[0][1]
    if version != SCHEMA_VERSION:
        raise StoreError(f"{where} has schema version {version}, not {SCHEMA_VERSION}")
    return True


def _blob(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class PostgresStore:
    """The audit log in a database set up by provision(), opened as its writer or reader role."""

    # Used by one thread at a time, like SqliteStore: the writer owns the writable one.

    def __init__(
        self, *, connection: Connection, dsn: str, read_only: bool, connect_timeout: int
    ) -> None:
        self._conn = connection
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self.where = describe(dsn)
        self.read_only = read_only
        self._head: Head | None = None

    @classmethod
    def open(
        cls, dsn: str, *, read_only: bool = False, connect_timeout: int = CONNECT_TIMEOUT
    ) -> PostgresStore:
        """Connect to the audit log at dsn; StoreError if it is unreachable or not a log."""
        where = describe(dsn)
        conn = cls._open_session(
            dsn, where=where, read_only=read_only, connect_timeout=connect_timeout
        )
        return cls(connection=conn, dsn=dsn, read_only=read_only, connect_timeout=connect_timeout)

    @staticmethod
    def _open_session(dsn: str, *, where: str, read_only: bool, connect_timeout: int) -> Connection:
        conn = _connect(dsn, where=where, connect_timeout=connect_timeout)
        try:
            if read_only:
                # Every transaction of this session is READ ONLY, so a reader
                # or the verifier cannot write even through a writer's role
                # (PostgreSQL docs, runtime-config-client: default_transaction_read_only).
                conn.execute("SET default_transaction_read_only = on")
            else:
                # A COMMIT returns only once its WAL is flushed to disk (and to
                # any synchronous standby): that is when an append is
                # acknowledged, whatever the role or database default says
                # (PostgreSQL docs, runtime-config-wal: synchronous_commit; wal-async-commit).
                conn.execute("SET synchronous_commit = on")
                fsync = conn.execute("SHOW fsync").fetchone()
                if fsync is None or fsync[0] != "on":
                    # With fsync off a committed append can vanish in a crash
                    # (PostgreSQL docs, runtime-config-wal: fsync).
                    log.warning(
                        "%s: the server runs with fsync off; appends are not durable", where
                    )
            if not _log_state(conn, where):
                raise StoreError(f"{where} is not a jitgate audit log (provision it first)")
            owner = conn.execute(
                "SELECT rolsuper OR pg_has_role(current_user, c.relowner, 'MEMBER')"
                " FROM pg_class c, pg_roles r"
                " WHERE c.oid = 'audit_records'::regclass AND r.rolname = current_user"
            ).fetchone()
            if owner is not None and owner[0] and not read_only:
                log.warning(
                    "%s: connected as the tables' owner or a superuser; use the writer role,"
                    " whose privileges stop it from changing what is stored",
                    where,
                )
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {where}: {exc}") from exc
        except StoreError:
            conn.close()
            raise
        return conn

    @classmethod
    def provision(
        cls,
        admin_dsn: str,
        *,
        writer_role: str,
        reader_role: str | None = None,
        connect_timeout: int = CONNECT_TIMEOUT,
    ) -> None:
        """Create the schema if absent, as the connected owner, and grant the roles their rights."""
        # Idempotent: on an existing log it only grants again. The writer may
        # INSERT and SELECT, the reader SELECT; neither may own the tables.
        where = describe(admin_dsn)
        conn = _connect(admin_dsn, where=where, connect_timeout=connect_timeout)
        try:
            with conn.transaction():
                # Two provisioners at once: the second waits and finds the log.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if not _log_state(conn, where):
                    for table in _TABLES[1:]:
                        found = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
                        if found is not None and found[0] is not None:
                            raise StoreError(f"{where} is not a jitgate audit log ({table})")
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(_INSERT_META, (APPLICATION_ID, SCHEMA_VERSION))
                    log.info("created the audit log in %s", where)
                roles = [writer_role] if reader_role is None else [writer_role, reader_role]
                for role in roles:
                    _check_role(conn, role, where)
                tables = sql.SQL(", ").join(sql.Identifier(t) for t in _TABLES)
                grantees = sql.SQL(", ").join([sql.SQL("PUBLIC"), *map(sql.Identifier, roles)])
                conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(tables, grantees))
                writer = sql.Identifier(writer_role)
                conn.execute(
                    sql.SQL(
                        "GRANT SELECT, INSERT ON audit_records, audit_checkpoints TO {}"
                    ).format(writer)
                )
                conn.execute(sql.SQL("GRANT SELECT ON audit_meta TO {}").format(writer))
                if reader_role is not None:
                    conn.execute(
                        sql.SQL("GRANT SELECT ON {} TO {}").format(
                            tables, sql.Identifier(reader_role)
                        )
                    )
        except psycopg.Error as exc:
            raise StoreError(f"cannot provision {where}: {exc}") from exc
        finally:
            conn.close()

    def _connection(self) -> Connection:
        if self._conn.closed:
            # The session was lost (server restart, terminated backend): a new
            # one is checked like the first.
            self._conn = self._open_session(
                self._dsn,
                where=self.where,
                read_only=self.read_only,
                connect_timeout=self._connect_timeout,
            )
            log.info("%s: reconnected", self.where)
        return self._conn

    def _read_head(self, conn: Connection) -> Head:
        row = conn.execute(_HEAD).fetchone()
        if row is None:
            return Head(size=0)
        return Head(size=int(row[0]) + 1, record_hash=_blob(row[1]))

    def head(self) -> Head:
        """Return the end of the log, from the server when it is not known for sure."""
        if self._head is None:
            try:
                self._head = self._read_head(self._connection())
            except psycopg.Error as exc:
                raise StoreError(f"cannot read the head of {self.where}: {exc}") from exc
        return self._head

    def append(self, records: Sequence[StoredRecord], checkpoint: StoredCheckpoint) -> Head:
        """Insert records and their checkpoint in one transaction; return once COMMIT is durable."""
        if self.read_only:
            raise StoreError(f"{self.where} is open read-only")
        head = self.head()
        check_continues(head, records, checkpoint)
        rows = [(r.index, r.time, r.caller, r.kind, r.canonical, r.record_hash) for r in records]
        try:
            conn = self._connection()
            with conn.transaction():
                # The writer role may not LOCK TABLE in a mode that keeps out
                # other inserters (PostgreSQL docs, sql-lock), so appenders queue
                # on an advisory lock and each then checks the head it builds on.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if self._read_head(conn) != head:
                    raise _HeadMoved
                with conn.cursor() as cur:
                    cur.executemany(_INSERT, rows)
                conn.execute(
                    _INSERT_CHECKPOINT,
                    (checkpoint.size, checkpoint.root, checkpoint.time, checkpoint.note),
                )
        except _HeadMoved:
            self._abandon()
            raise StoreError(
                f"append of {len(rows)} records to {self.where} refused: another writer"
                f" appended after record {head.size - 1}"
            ) from None
        except (psycopg.Error, StoreError) as exc:
            self._abandon()
            raise StoreError(
                f"append of {len(rows)} records to {self.where} failed: {exc}"
            ) from exc
        if records:
            self._head = Head(size=records[-1].index + 1, record_hash=records[-1].record_hash)
        return self.head()

    def _abandon(self) -> None:
        # A COMMIT whose connection was lost may or may not have happened, so
        # the head is whatever the server now says: the next batch continues
        # the log without a gap or a duplicate.
        self._head = None
        try:
            self.head()
        except StoreError as exc:
            log.error("audit store %s: head unknown after a failed append: %s", self.where, exc)
            self._head = None

    def read(self, from_index: int, limit: int) -> list[StoredRecord]:
        """Return up to limit records from from_index on, in index order."""
        if from_index > _MAX_INDEX or limit <= 0:
            return []
        try:
            rows = (
                self._connection()
                .execute(_SELECT, (max(from_index, 0), min(limit, _MAX_INDEX)))
                .fetchall()
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot read {self.where}: {exc}") from exc
        return [record_from_row(row) for row in rows]

    def checkpoints(self, from_size: int, limit: int) -> list[StoredCheckpoint]:
        """Return up to limit checkpoints of size from_size or more, smallest first."""
        if from_size > _MAX_INDEX or limit <= 0:
            return []
        try:
            rows = (
                self._connection()
                .execute(_SELECT_CHECKPOINTS, (max(from_size, 0), min(limit, _MAX_INDEX)))
                .fetchall()
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the checkpoints of {self.where}: {exc}") from exc
        return [checkpoint_from_row(row) for row in rows]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """Return the checkpoint of the largest size, if there is one."""
        try:
            row = self._connection().execute(_LATEST_CHECKPOINT).fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"cannot read the checkpoints of {self.where}: {exc}") from exc
        return None if row is None else checkpoint_from_row(row)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()


def _check_role(conn: Connection, role: str, where: str) -> None:
    """Refuse a role that does not exist or that privileges would not bind."""
    row = conn.execute(
        "SELECT r.rolsuper, pg_has_role(r.oid, c.relowner, 'MEMBER')"
        " FROM pg_roles r, pg_class c"
        " WHERE r.rolname = %s AND c.oid = 'audit_records'::regclass",
        (role,),
    ).fetchone()
    if row is None:
        raise StoreError(f"cannot provision {where}: role {role!r} does not exist")
    superuser, owner = row
    if superuser or owner:
        # A superuser bypasses privileges and an owner can alter the tables
        # (PostgreSQL docs, ddl-priv): neither could be held to INSERT.
        raise StoreError(
            f"cannot provision {where}: role {role!r} is a superuser or owns the audit tables"
        )
