#!/bin/sh
# Build the Raspberry Pi packages on an x86-64 Debian machine, and (with --test) run the demo and
# the test suite under emulation. Run as root from the repository:
#
#   packaging/cross.sh [--root DIR] [--test] [TARGET ...]
#
# TARGET: aarch64-unknown-linux-gnu (Pi 3/4/5, Zero 2 W with a 64-bit OS) and/or
# armv7-unknown-linux-gnueabihf (32-bit Raspberry Pi OS); both by default. The .debs land in
# target/cross/TARGET/debian/.
#
# How: Debian's unstable distribution ships a Rust new enough for Cargo.lock together with its
# standard library for arm64 and armhf, the cross compilers and qemu-user. They are installed in
# a debootstrap root of unstable (DIR, default /var/tmp/rufus-cross, kept for the next run), and
# the build runs there with the repository bound in. The machine's own cargo registry cache and
# CA bundle are shared with it. With --test, qemu is registered with binfmt_misc for the run (so
# the tests start the ARM binary as they would a native one) and unregistered afterwards.
# ARMv6 boards (Pi 1, Zero W) need arm-unknown-linux-gnueabihf, which Debian's Rust does not ship.
set -eu

root=/var/tmp/rufus-cross
test=false
targets=""
while [ $# -gt 0 ]; do
    case $1 in
        --root) root=$2; shift 2 ;;
        --test) test=true; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) targets="$targets $1"; shift ;;
    esac
done
targets=${targets:-aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf}
repo=$(cd "$(dirname "$0")/.." && pwd)
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | grep -v security | head -n 1)
mirror=${mirror:-http://deb.debian.org/debian}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
cabundle=/etc/ssl/certs/ca-certificates.crt

say() { printf '\n-- %s (%s)\n' "$*" "$(date +%T)"; }

# 1. The root: Debian unstable with Rust, both standard libraries, cross compilers and qemu.
if [ ! -x "$root/usr/bin/apt-get" ]; then
    say "debootstrap unstable into $root"
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    rm -rf "$root.partial"
    debootstrap --variant=minbase sid "$root.partial" "$mirror"
    mv "$root.partial" "$root"
fi
if [ ! -x "$root/usr/bin/cargo" ]; then
    chroot "$root" dpkg --add-architecture arm64
    chroot "$root" dpkg --add-architecture armhf
    # The mirror's unstable Release file may be past its validity date.
    chroot "$root" apt-get -o Acquire::Check-Valid-Until=false update -qq
    say "Rust, standard libraries, cross compilers, qemu"
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rustc cargo libstd-rust-dev:arm64 libstd-rust-dev:armhf \
        gcc gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev:arm64 libc6-dev:armhf \
        qemu-user ca-certificates dpkg-dev python3 >/dev/null
fi
chroot "$root" rustc --version

# 2. Mounts: the repository, the cargo cache, /proc and /dev (the demo needs a pseudo-terminal).
mounted=""
bind() {
    mkdir -p "$root$2"
    mount --bind "$1" "$root$2"
    mounted="$root$2 $mounted"
}
binfmt=""
cleanup() {
    for name in $binfmt; do
        [ -e "/proc/sys/fs/binfmt_misc/$name" ] && echo -1 > "/proc/sys/fs/binfmt_misc/$name"
    done
    for m in $mounted; do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
mkdir -p "$cargo_home/registry" "$root/proc"
mount -t proc proc "$root/proc"; mounted="$root/proc $mounted"
bind /dev /dev
bind /dev/pts /dev/pts
bind "$repo" /src
# The reader fixtures beside the checkout, for the optional checks that read them.
if [ -d "$repo/../shared" ]; then bind "$repo/../shared" /shared; fi
bind "$cargo_home/registry" /cargo/registry
cp "$cabundle" "$root/etc/ssl/certs/host-ca.crt"

# cargo-deb: the machine's own when it has one (it runs on any newer glibc), else built there.
if command -v cargo-deb >/dev/null; then
    cp "$(command -v cargo-deb)" "$root/usr/local/bin/cargo-deb"
fi

inside() {
    chroot "$root" env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root CARGO_HOME=/cargo \
        CARGO_TARGET_DIR=/src/target/cross CARGO_TERM_COLOR=never \
        CARGO_HTTP_CAINFO=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc \
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc \
        AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar AR_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-ar \
        RUST_BACKTRACE=1 "$@"
}
if [ ! -x "$root/usr/local/bin/cargo-deb" ]; then
    say "cargo-deb"
    inside cargo install --locked --version 3.8.0 --root /usr/local cargo-deb
fi

# 3. Emulation for --test: qemu's static binaries registered with the kernel (F: opened now,
# so they work inside the root), removed again at exit.
if $test; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    qemu_bin() { for b in "$root/usr/bin/$1-static" "$root/usr/bin/$1"; do [ -x "$b" ] && { echo "${b#"$root"}"; return; }; done; }
    register() {
        name=$1; magic=$2; mask=$3; interp=$(qemu_bin "$4")
        [ -n "$interp" ] || { echo "no $4 in $root" >&2; exit 1; }
        [ -e "/proc/sys/fs/binfmt_misc/$name" ] && echo -1 > "/proc/sys/fs/binfmt_misc/$name"
        # F: the kernel opens the interpreter now, so the path needs to hold only at registration.
        printf '%s' ":$name:M::$magic:$mask:$root$interp:F" > /proc/sys/fs/binfmt_misc/register
        binfmt="$binfmt $name"
    }
    register rufus-qemu-aarch64 \
        '\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00' \
        '\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' qemu-aarch64
    register rufus-qemu-arm \
        '\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00' \
        '\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff' qemu-arm
fi

for target in $targets; do
    start=$(date +%s)
    say "$target: release build"
    inside sh -c "cd /src && cargo build --release --locked --target $target"
    built=$(( $(date +%s) - start ))
    say "$target: package"
    inside sh -c "cd /src && cargo deb --locked --no-build --target $target"
    ls -l "$repo/target/cross/$target/debian/"*.deb
    echo "$target: release build ${built}s"
    if $test; then
        say "$target: the demo under emulation"
        inside sh -c "cd /src && target/cross/$target/release/rufus-gateway demo --duration 12" > "$repo/target/cross/$target/demo.log" 2>&1 || {
            cat "$repo/target/cross/$target/demo.log"; exit 1; }
        tail -n 12 "$repo/target/cross/$target/demo.log"
        say "$target: the test suite under emulation"
        # Output uncaptured, so the tests that cannot run here say so ("skipped: …"); the whole
        # log is kept, the summary lines printed.
        log="$repo/target/cross/$target/test.log"
        start=$(date +%s)
        if inside env RUFUS_GATEWAY_EMULATED=qemu sh -c "cd /src && cargo test --locked --no-fail-fast --target $target -- --nocapture" > "$log" 2>&1; then
            failed=false
        else
            failed=true
        fi
        grep -E '^test result|skipped:|^test .* FAILED|panicked at' "$log" || true
        echo "$target: emulated suite $(( $(date +%s) - start ))s (log: target/cross/$target/test.log)"
        if $failed; then
            tail -n 150 "$log"
            exit 1
        fi
    fi
done
