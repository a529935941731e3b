"""Asks BENCH@127.0.0.1:PORT for COUNT direct-tcpip channels (port forwards, refused) with
asyncssh, all sent at once; prints how many were refused and whether the server closed the
connection.

usage: asyncssh_refusals.py PORT BENCH KEY KNOWN_HOSTS COUNT
"""

import asyncio
import sys
import warnings

warnings.filterwarnings("ignore")

import asyncssh  # noqa: E402


async def main(port: int, bench: str, key_path: str, known_hosts: str, count: int) -> None:
    key = asyncssh.read_private_key(key_path)
    cert = asyncssh.read_certificate(key_path + "-cert.pub")
    conn = await asyncssh.connect(
        "127.0.0.1",
        port,
        username=bench,
        client_keys=[(key, cert)],
        known_hosts=known_hosts,
        agent_path=None,
    )
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
