"""Opens a terminal session on BENCH@127.0.0.1:PORT with asyncssh and sends COUNT
window-change requests as fast as it can (the last one 123x45), then a line; the session
prints the terminal size it ends with (`stty size`).

usage: asyncssh_resize.py PORT BENCH KEY KNOWN_HOSTS COUNT
"""

import asyncio
import sys
from connect import connect


async def main(port: int, bench: str, key_path: str, known_hosts: str, count: int) -> None:
    async with await connect(port, bench, key_path, known_hosts) as conn:
        async with conn.create_process(
            "echo ready; read line; stty size", term_type="xterm", term_size=(80, 24)
        ) as proc:
            assert (await proc.stdout.readline()).strip() == "ready"
            for i in range(count - 1):
                proc.change_terminal_size(60 + i % 100, 20 + i % 30)
            proc.change_terminal_size(123, 45)
            # The last size reaches the terminal within a quarter of a second.
            await asyncio.sleep(1)
            proc.stdin.write("\n")
            print((await proc.stdout.read()).strip().splitlines()[-1])


if __name__ == "__main__":
    port, bench, key_path, known_hosts, count = sys.argv[1:]
    asyncio.run(main(int(port), bench, key_path, known_hosts, int(count)))
