"""Asks BENCH@127.0.0.1:PORT for COUNT direct-tcpip channels (port forwards, refused) with
asyncssh, all sent at once; prints how many were refused and whether the server closed the
connection.

usage: asyncssh_refusals.py PORT BENCH KEY KNOWN_HOSTS COUNT
"""

import asyncio
import sys

from connect import connect  # first: it quiets asyncssh's import warnings

import asyncssh  # noqa: E402


async def main(port: int, bench: str, key_path: str, known_hosts: str, count: int) -> None:
    conn = await connect(port, bench, key_path, known_hosts)
    opens = [conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 22) for _ in range(count)]
    results = await asyncio.gather(*opens, return_exceptions=True)
    refused = sum(isinstance(r, asyncssh.ChannelOpenError) for r in results)
    try:
        await asyncio.wait_for(conn.wait_closed(), 10)
        closed = True
    except asyncio.TimeoutError:
        closed = False
    print(refused, closed)


if __name__ == "__main__":
    port, bench, key_path, known_hosts, count = sys.argv[1:]
    asyncio.run(main(int(port), bench, key_path, known_hosts, int(count)))
