#!/usr/bin/env bash
# Builds the small bench image the tests and the demo use, from Debian's busybox-static, with
# `docker import` (no registry needed): users root, frappe (1000) and other (1001), and
# /home/frappe/frappe-bench. Prints the image name. Rebuilds only when missing.
set -euo pipefail
image="${BENCHGATE_BENCH_IMAGE:-benchgate-bench:busybox}"
if docker image inspect "$image" >/dev/null 2>&1; then echo "$image"; exit 0; fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,etc,root,tmp,proc,sys,dev,home/frappe/frappe-bench,home/other}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nfrappe:x:1000:1000:frappe:/home/frappe:/bin/sh\nother:x:1001:1001:other:/home/other:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\nfrappe:x:1000:\nother:x:1001:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$root.tar" .
# Ownership of the home directories is set inside the image after import.
docker import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' "$root.tar" "$image-base" >/dev/null
rm -f "$root.tar"
cid=$(docker create "$image-base" sh -c 'chown -R 1000:1000 /home/frappe && chown -R 1001:1001 /home/other')
docker start -a "$cid" >/dev/null
docker commit --change 'CMD ["/bin/sh"]' "$cid" "$image" >/dev/null
docker rm "$cid" >/dev/null
docker rmi "$image-base" >/dev/null
echo "$image"
