"""Opens N Server-Sent Events streams to fhirgate and holds them; prints the server's RSS growth.

Run by benches/sse_idle.sh: python3 sse_idle.py PORT API_KEY N SERVER_PID
"""
import asyncio
import sys


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_stream(port, key, ready, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    if path.startswith("/events"):
        await reader.readuntil(b"\n\n")  # the hello event
    else:
        length = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
        await reader.readexactly(int(length[0].split(b":")[1]))
    ready.append(1)
    return reader, writer


async def main():
    port, key, count, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    # Another path (e.g. /healthz) measures what an idle keep-alive connection costs without SSE.
    path = sys.argv[5] if len(sys.argv) > 5 else "/events?tenant=clinic"
    hold = float(sys.argv[6]) if len(sys.argv) > 6 else 17
    before = rss_kib(pid)
    ready = []
    streams = []
    for start in range(0, count, 500):
        batch = [open_stream(port, key, ready, path) for _ in range(min(500, count - start))]
        streams.extend(await asyncio.gather(*batch))
    # Hold them through a heartbeat so every connection has sent and received.
    await asyncio.sleep(hold)
    after = rss_kib(pid)
    print(f"{len(ready)} idle connections ({path}): RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB "
          f"(+{(after - before) / 1024:.1f} MB, {(after - before) * 1024 / max(1, len(ready)):.0f} bytes each)")
    for _, writer in streams:
        writer.close()


asyncio.run(main())
