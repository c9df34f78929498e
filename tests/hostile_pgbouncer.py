"""A hostile stand-in for PgBouncer's admin console: whoever controls the
address a pooler was added with (or PgBouncer itself, fed odd names by its
clients) answers what it likes. Speaks the PostgreSQL wire protocol far
enough for libpq and dblink: trust login, then simple queries.

    python3 hostile_pgbouncer.py PORT ANSWERS.json

ANSWERS.json maps a command's second word (VERSION, POOLS, DATABASES,
TOTALS, CONFIG) or first word (SET) to {"rows": [[...], ...], "ncols": N,
"no_end": true}: rows of text values ("hex:..." for raw bytes), the number
of columns, and whether to leave the answer unfinished (no ReadyForQuery).
Read again for every command, so a test can change it between ticks.
"""
import asyncio
import json
import struct
import sys


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def value(v) -> bytes:
    if v is None:
        return struct.pack("!i", -1)
    raw = bytes.fromhex(v[4:]) if isinstance(v, str) and v.startswith("hex:") else str(v).encode()
    return struct.pack("!i", len(raw)) + raw


def answer(spec: dict) -> bytes:
    rows = spec.get("rows", [])
    ncols = spec.get("ncols", len(rows[0]) if rows else 1)
    out = struct.pack("!H", ncols)
    for i in range(ncols):   # every column text (oid 25)
        out += f"c{i + 1}".encode() + b"\0" + struct.pack("!IHIhih", 0, 0, 25, -1, -1, 0)
    data = message(b"T", out)
    for row in rows:
        data += message(b"D", struct.pack("!H", len(row)) + b"".join(value(v) for v in row))
    return data + message(b"C", b"SHOW\0")


async def serve(reader, writer, answers_path: str):
    try:
        while True:   # SSL/GSS requests are refused, then the startup packet
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            code = struct.unpack("!I", (await reader.readexactly(length - 4))[:4])[0]
            if code in (80877103, 80877104):
                writer.write(b"N")
                continue
            break
        writer.write(message(b"R", struct.pack("!I", 0)))
        for k, v in (("server_version", "1.18.0/bouncer"), ("client_encoding", "UTF8"),
                     ("server_encoding", "UTF8"), ("standard_conforming_strings", "on")):
            writer.write(message(b"S", k.encode() + b"\0" + v.encode() + b"\0"))
        writer.write(message(b"Z", b"I"))
        await writer.drain()
        while True:
            kind = await reader.readexactly(1)
            length = struct.unpack("!I", await reader.readexactly(4))[0]
            body = await reader.readexactly(length - 4)
            if kind == b"X":
                return
            words = body.rstrip(b"\0").decode().split()
            key = words[1].upper() if words[0].upper() == "SHOW" else words[0].upper()
            with open(answers_path) as f:
                spec = json.load(f).get(key, {})
            writer.write(message(b"C", b"SET\0") if key == "SET" else answer(spec))
            await writer.drain()
            if spec.get("no_end"):
                await asyncio.sleep(3600)
            writer.write(message(b"Z", b"I"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int, answers_path: str):
    server = await asyncio.start_server(lambda r, w: serve(r, w, answers_path), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
