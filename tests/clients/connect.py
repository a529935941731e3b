"""What every test client shares: an asyncssh connection to BENCH@127.0.0.1:PORT with the key
at KEY_PATH and its certificate beside it, the bastion's host key pinned in KNOWN_HOSTS."""

import warnings

warnings.filterwarnings("ignore")

import asyncssh  # noqa: E402


async def connect(port: int, bench: str, key_path: str, known_hosts: str) -> asyncssh.SSHClientConnection:
    key = asyncssh.read_private_key(key_path)
    cert = asyncssh.read_certificate(key_path + "-cert.pub")
    return await asyncssh.connect(
        "127.0.0.1",
        port,
        username=bench,
        client_keys=[(key, cert)],
        known_hosts=known_hosts,
        agent_path=None,
    )
