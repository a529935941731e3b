#!/usr/bin/env bash
# Makes the fuzz targets' seed corpora from real inputs: certificates and KRLs from
# ssh-keygen, PROXY headers sent by HAProxy, the example configs, frames from a real
# `docker exec`, and terminal output. Run once; the seeds are committed (keys are random).
set -euo pipefail
cd "$(dirname "$0")"
seeds=$PWD/seeds
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$seeds" && mkdir -p "$seeds"/{cert,krl,proxy,config,demux,asciicast}

# Certificates: an ed25519 CA (trusted by the cert target), users of each key type, the
# options benchgate enforces, a host certificate, an RSA CA and an expired one.
ssh-keygen -q -t ed25519 -N '' -C ca -f "$work/ca"
ssh-keygen -q -t rsa -b 2048 -N '' -C rsa-ca -f "$work/rsa-ca"
cp "$work/ca.pub" "$seeds/ca.pub"
now=$(date +%s)
n=0
mint() { # key-type ca extra-args...
    local type=$1 ca=$2; shift 2
    n=$((n + 1))
    ssh-keygen -q -t "$type" -N '' -f "$work/u$n"
    ssh-keygen -q -s "$work/$ca" "$@" "$work/u$n.pub"
    cp "$work/u$n-cert.pub" "$seeds/cert/text-$n"
    # The wire form, as russh hands a certificate over.
    cut -d' ' -f2 "$work/u$n-cert.pub" | base64 -d > "$seeds/cert/wire-$n"
}
mint ed25519 ca -I alice@example.com -n shop -V -5m:+6h -z 7
cp "$work/u1-cert.pub" "$seeds/cert/user-cert.pub"
mint ecdsa ca -I bob -n shop,team -V -5m:+6h -z 8 -O source-address=192.0.2.0/24,10.0.0.1
mint ed25519 ca -I carol -n shop -V -5m:+6h -O force-command=/bin/date -O no-pty
mint rsa ca -I dave -n shop -V -5m:+7h
mint ed25519 ca -I host -h -n shop -V -5m:+6h
mint ed25519 rsa-ca -I rsa-signed -n shop -V -5m:+6h -t rsa-sha2-512
mint ed25519 ca -I old -n shop -V 20200101:20200102
mint ecdsa ca -I many -n "$(seq -s, -f 'bench%g' 1 40)" -V -5m:+6h -O source-address=2001:db8::/32

# KRLs: serials, a range, key IDs, a key and its hash, and the plain key-list form.
printf 'serial: 7\nserial: 100-200\nid: mallory\nid: alice@example.com\n' > "$work/spec"
ssh-keygen -q -k -f "$seeds/krl/revoked.krl" -s "$work/ca.pub" "$work/spec"
printf 'serial: 1-5\nserial: 9\nserial: 11\nserial: 4000-4100\n' > "$work/spec2"
ssh-keygen -q -k -f "$seeds/krl/bitmap.krl" -s "$work/ca.pub" "$work/spec2"
ssh-keygen -q -k -f "$seeds/krl/keys.krl" "$work/u2.pub" "$work/u3.pub"
{ printf 'hash: %s\n' "$(ssh-keygen -lf "$work/u4.pub" | cut -d' ' -f2)"
  printf 'sha1: %s\n' "$(cat "$work/u6.pub")"; } > "$work/spec3"
ssh-keygen -q -k -f "$seeds/krl/hash.krl" "$work/spec3"
ssh-keygen -q -k -f "$seeds/krl/empty.krl" /dev/null
cat "$work/u2.pub" "$work/u5.pub" > "$seeds/krl/keys.txt"

# PROXY headers as HAProxy sends them (v1 and v2, IPv4 and IPv6, and a v2 health check),
# captured on a listener, plus the forms its documentation gives.
if command -v haproxy >/dev/null && command -v socat >/dev/null; then
    for mode in send-proxy send-proxy-v2 "send-proxy-v2 proxy-v2-options unique-id"; do
        name=$(echo "$mode" | tr ' ' _)
        for family in ipv4 ipv6; do
            if [ $family = ipv4 ]; then from=127.0.0.1 connect=127.0.0.1; else from=::1 connect='[::1]'; fi
            port=$((20000 + RANDOM % 20000)) back=$((20000 + RANDOM % 20000))
            cat > "$work/h.cfg" <<CFG
global
  log stderr local0 emerg
defaults
  mode tcp
  timeout connect 2s
  timeout client 2s
  timeout server 2s
frontend f
  bind $family@$from:$port
  unique-id-format abc123
  default_backend b
backend b
  server s 127.0.0.1:$back $mode
CFG
            socat -u TCP-LISTEN:$back,reuseaddr OPEN:"$seeds/proxy/haproxy-$name-$family",creat &
            sink=$!
            sleep 0.2
            haproxy -f "$work/h.cfg" &
            hp=$!
            sleep 0.5
            printf 'SSH-2.0-OpenSSH_9.2\r\n' | socat -t1 - TCP:$connect:$port || true
            sleep 0.3
            kill $hp $sink 2>/dev/null || true
            wait $hp $sink 2>/dev/null || true
        done
    done
else
    echo "seeds.sh: haproxy and socat are needed for the PROXY seeds (scripts/setup.sh)" >&2
    exit 1
fi
printf 'PROXY TCP4 192.0.2.7 198.51.100.1 56324 2222\r\nSSH-2.0-x\r\n' > "$seeds/proxy/v1-tcp4"
printf 'PROXY TCP6 2001:db8::7 2001:db8::1 56324 2222\r\n' > "$seeds/proxy/v1-tcp6"
printf 'PROXY UNKNOWN\r\n' > "$seeds/proxy/v1-unknown"
printf '\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00' > "$seeds/proxy/v2-local"

# Configs: the examples as shipped.
cp ../config/*.toml "$seeds/config/"

# Docker's exec stream: frames from a real engine (stdout and stderr of a shell), as the
# attach endpoint sends them.
if docker image inspect benchgate-bench:busybox >/dev/null 2>&1; then
    c=$(docker run -d --rm benchgate-bench:busybox sleep 30)
    id=$(curl -s --unix-socket /var/run/docker.sock -H 'Content-Type: application/json' \
        -d '{"AttachStdout":true,"AttachStderr":true,"Cmd":["sh","-c","echo out; echo err >&2; seq 1 3000; echo done >&2"]}' \
        "http://d/containers/$c/exec" | sed 's/.*"Id":"\([0-9a-f]*\)".*/\1/')
    curl -s --unix-socket /var/run/docker.sock -H 'Content-Type: application/json' \
        -d '{"Detach":false,"Tty":false}' "http://d/exec/$id/start" -o "$seeds/demux/exec-start"
    docker rm -f "$c" >/dev/null
else
    echo "seeds.sh: the bench image is needed for the demux seed (scripts/bench-image.sh)" >&2
    exit 1
fi
printf '\1\0\0\0\0\0\0\5hello\2\0\0\0\0\0\0\3err\1\0\0\0\0\0\0\0' > "$seeds/demux/small"

# Terminal output: UTF-8 cut in sequences, escapes, invalid bytes.
printf 'h\xc3\xa9llo \xe2\x98\x83\r\n\x1b[31mred\x1b[0m\n' > "$seeds/asciicast/utf8"
printf '\x03\xff\xfe\xe2\x82\xac\xf0\x9f\x98\x80\xed\xa0\x80\xc0\xaf' > "$seeds/asciicast/invalid"
ls -R "$seeds" | head -80
