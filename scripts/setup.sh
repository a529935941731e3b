#!/usr/bin/env bash
# Makes sure this machine has what benchgate's build and tests need, installing from Debian's
# packages where something is missing. Fails loudly; never skips.
set -euo pipefail

need_apt=()
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)

if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

for tool in cargo ssh ssh-keygen cc; do
  command -v "$tool" >/dev/null 2>&1 || { echo "setup: $tool is required but missing" >&2; exit 1; }
done
