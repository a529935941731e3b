"""Sends SIZE MiB through `cat` on BENCH@127.0.0.1:PORT with asyncssh (another SSH
implementation than OpenSSH, with its own window handling), reading the output as it comes;
prints the bytes that came back and whether they are the ones sent.

usage: asyncssh_cat.py PORT BENCH KEY KNOWN_HOSTS SIZE_MIB
"""

import asyncio
import hashlib
import sys
from connect import connect


async def main(port: int, bench: str, key_path: str, known_hosts: str, mib: int) -> None:
    block = bytes(range(256)) * 4096
    sent, received, count = hashlib.sha256(), hashlib.sha256(), 0
    async with await connect(port, bench, key_path, known_hosts) as conn:
        async with conn.create_process("cat", encoding=None) as proc:

            async def feed() -> None:
                for _ in range(mib):
                    proc.stdin.write(block)
                    sent.update(block)
                    await proc.stdin.drain()
                proc.stdin.write_eof()

            async def read() -> None:
                nonlocal count
                while chunk := await proc.stdout.read(65536):
                    received.update(chunk)
                    count += len(chunk)

            await asyncio.gather(feed(), read())
            await proc.wait()
    print(count, received.hexdigest() == sent.hexdigest())


asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])))
