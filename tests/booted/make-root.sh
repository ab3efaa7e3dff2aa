#!/bin/sh
# Prepare the Debian 12 root the booted-system suite (tests/it/booted.rs) boots: a debootstrap
# minbase with systemd and udev, as a freshly installed box would have it, and never the package.
#   tests/booted/make-root.sh ROOT [MIRROR]
set -eu
root=$1
mirror=${2:-$(sed -n 's/^URIs: *//p; s/^deb  *\(http[^ ]*\) .*/\1/p' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1)}
mirror=${mirror:-http://deb.debian.org/debian}
if [ -x "$root/usr/lib/systemd/systemd" ]; then
    echo "$root is ready"
    exit 0
fi
rm -rf "$root.partial"
debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,udev,dbus,ca-certificates,python3,adduser \
    bookworm "$root.partial" "$mirror"
# No console login and no network management inside the container: the host's network is shared.
chroot "$root.partial" systemctl mask console-getty.service systemd-networkd.service systemd-resolved.service >/dev/null 2>&1 || true
echo booted-test > "$root.partial/etc/hostname"
mv "$root.partial" "$root"
echo "$root is ready"
