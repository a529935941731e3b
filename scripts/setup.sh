#!/usr/bin/env bash
# Makes sure this machine has what benchgate's build and tests need, installing from Debian's
# packages where something is missing, and that a Docker engine answers (starting dockerd in
# the background if needed). Fails loudly; never skips.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
need_apt=()
need() { command -v "$1" >/dev/null 2>&1 || need_apt+=("$2"); }
need ssh openssh-client
need ssh-keygen openssh-client
need cc gcc
need tmux tmux
need rsync rsync
need socat socat
need stunnel stunnel4
need openssl openssl
need systemd-analyze systemd
need systemd-socket-activate systemd
need haproxy haproxy
need sftp openssh-client
need python3 python3
[ -x /bin/busybox ] || need_apt+=(busybox-static)
# The load harness's baseline (benches/load): OpenSSH sshd as the usual bench bastion.
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
docker_ok() { docker info >/dev/null 2>&1; }
if ! docker_ok; then
  command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
fi

if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! docker_ok; then
  echo "setup: starting dockerd in the background (log: /tmp/benchgate-dockerd.log)" >&2
  $SUDO sh -c 'nohup dockerd >/tmp/benchgate-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do docker_ok && break; sleep 1; done
fi

for tool in cargo ssh ssh-keygen sftp scp rsync tmux socat stunnel openssl systemd-analyze cc docker; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is required but missing" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "setup: /bin/busybox (busybox-static) is required but missing" >&2; exit 1; }
[ -x /usr/sbin/sshd ] || { echo "setup: /usr/sbin/sshd (openssh-server) is required but missing" >&2; exit 1; }
# A second SSH client implementation for the liveness tests (PyPI).
if ! python3 -c 'import asyncssh' >/dev/null 2>&1; then
  echo "setup: installing asyncssh (PyPI)" >&2
  python3 -m pip install -q asyncssh || python3 -m pip install -q --break-system-packages asyncssh \
    || { echo "setup: cannot install asyncssh with pip (python3 -m pip)" >&2; exit 1; }
fi
python3 -c 'import asyncssh' >/dev/null 2>&1 || { echo "setup: python3 module asyncssh is required but missing" >&2; exit 1; }
docker_ok || { echo "setup: the Docker engine does not answer (see /tmp/benchgate-dockerd.log); start it with: dockerd &" >&2; exit 1; }
bash "$(dirname "$0")/bench-image.sh"
