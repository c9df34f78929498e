"""Job data in a database whose encoding is not UTF-8 (issue 19, found by
the red team): an enqueuer's text that is valid there (LATIN1 'café') or
any bytes (SQL_ASCII) must not break the claims of a whole queue.

claim_jobs answers each job's data as the jsonb it is (never through
UTF-8 text), and a job whose concurrency key is not UTF-8 (slots take keys
in UTF-8) is out of the claim index, counted invalid and left as it is,
while its tenant's other jobs are claimed."""
import uuid

import psycopg
import pytest

from test_queue_owners import S, install_pgmq


@pytest.mark.parametrize("field", ["key", "note"])
@pytest.mark.parametrize("encoding,text_sql", [
    ("LATIN1", "'caf' || chr(233)"),                                  # 'café', valid LATIN1
    ("SQL_ASCII", "convert_from('\\x6bff'::bytea, 'SQL_ASCII')"),      # 'k' and the byte 0xff
])
def test_text_that_is_not_utf8_in_a_job_does_not_break_claims(cluster, encoding, text_sql, field):
    db = f"mlenc_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db} ENCODING '{encoding}' LOCALE_PROVIDER libc "
                  "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with cluster.connect(dbname=db) as c:
            c.execute(f"CREATE EXTENSION {S}")
        install_pgmq(cluster, db)
        tenant = str(uuid.uuid4())
        with cluster.connect(dbname=db) as c:
            c.execute("SET client_encoding = 'SQL_ASCII'")
            c.execute("SELECT pgmq.create('q')")
            c.execute(f"SELECT {S}.bind_queue('pgmq', 'q', 'tenant_id', NULL, 'key')")
            odd = c.execute(f"SELECT (pgmq.send('q', jsonb_build_object('tenant_id', %s::text, '{field}', "
                            f"{text_sql})))::text", (tenant,)).fetchone()[0]
            c.execute("SELECT pgmq.send('q', jsonb_build_object('tenant_id', %s::text, 'key', 'plain'))",
                      (tenant,))
            try:
                rows = c.execute(f"SELECT job_id, data::text, concurrency_key "
                                 f"FROM {S}.claim_jobs('pgmq', 'q', 10) ORDER BY job_id").fetchall()
            except psycopg.Error as e:
                pytest.fail(f"claim_jobs failed: {e.sqlstate} {e.diag.message_primary}")
            sent = dict(c.execute("SELECT msg_id::text, message::text FROM pgmq.q_q").fetchall())
            if field == "note":
                # Both claimed, the data exactly as sent.
                assert [r[0] for r in rows] == sorted(sent), rows
                assert all(r[1] == sent[r[0]] for r in rows), (rows, sent)
            else:
                # The job with the key slots cannot take is left as it is.
                assert [r[2] for r in rows] == [b"plain"], rows  # (bytes: client_encoding SQL_ASCII)
                assert odd not in [r[0] for r in rows]
                assert c.execute(f"SELECT invalid FROM {S}.explain_queues() WHERE tenant_id = %s",
                                 (tenant,)).fetchone()[0] == 1
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_a_key_that_is_not_utf8_is_22023_in_explain_admission(cluster):
    """explain_admission, which tenants call over RPC, counts a key's slots
    by the key: bytes that are not UTF-8 are a bad argument, not XX000."""
    db = f"mlenc_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db} ENCODING 'SQL_ASCII' LOCALE_PROVIDER libc "
                  "LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        with cluster.connect(dbname=db) as c:
            c.execute(f"CREATE EXTENSION {S}")
            c.execute("SET client_encoding = 'SQL_ASCII'")
            with pytest.raises(psycopg.Error) as e:
                c.execute(f"SELECT * FROM {S}.explain_admission(%s, NULL, "
                          "convert_from('\\x6bff'::bytea, 'SQL_ASCII'))", (str(uuid.uuid4()),))
            assert e.value.sqlstate == "22023", e.value
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
