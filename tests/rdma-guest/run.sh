#!/usr/bin/env bash
# Boots a QEMU guest running Debian's kernel with Soft-RoCE (rdma_rxe) and runs one shell
# command in it: the only way to exercise RDMA verbs on a host without an RDMA device.
#
# usage: tests/rdma-guest/run.sh [-b BINARY]... -- COMMAND...
#   -b BINARY   copy BINARY (and the libraries ldd names for it) into the guest's /bin
#   COMMAND     run by the guest's busybox sh after rxe0 is up; its output is printed between
#               ==RDMA-GUEST-BEGIN== and ==RDMA-GUEST-END== lines, and its exit status is
#               this script's exit status
# environment:
#   RDMA_GUEST_CACHE   where the kernel package and the built initramfs live
#                      (default: target/rdma-guest under the repository)
#   RDMA_GUEST_KERNEL  Debian kernel package to boot (default: what linux-image-amd64 depends on)
#   RDMA_GUEST_TIMEOUT seconds before the guest is killed (default 300)
# Needs: qemu-system-x86_64, busybox (static), apt-get (downloads only the Debian kernel
# package), dpkg-deb, depmod (kmod), cpio, rdma (iproute2), ibverbs-utils, ibverbs-providers.
# The guest runs under TCG (software emulation); RDMA_GUEST_KVM=1 tries KVM instead (nested
# KVM hangs or aborts on some hosts, hence not the default).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${RDMA_GUEST_CACHE:-$repo/target/rdma-guest}
timeout_s=${RDMA_GUEST_TIMEOUT:-300}

extra=()
while [ $# -gt 0 ]; do
    case $1 in
        -b) extra+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "rdma-guest: unknown argument $1 (usage: run.sh [-b BINARY]... -- COMMAND...)" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "rdma-guest: no command given (usage: run.sh [-b BINARY]... -- COMMAND...)" >&2; exit 2; }

need() {
    command -v "$1" >/dev/null || { echo "rdma-guest: $1 not found; install $2" >&2; exit 3; }
}
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need dpkg-deb dpkg
need depmod kmod
need cpio cpio
need rdma iproute2
need ibv_devices ibverbs-utils
busybox_bin=$(command -v busybox)
if ldd "$busybox_bin" >/dev/null 2>&1; then
    echo "rdma-guest: $busybox_bin is dynamically linked; install busybox-static" >&2; exit 3
fi
rxe_provider=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so 2>/dev/null | head -n1 || true)
[ -n "$rxe_provider" ] && [ -f /etc/libibverbs.d/rxe.driver ] \
    || { echo "rdma-guest: the rxe verbs provider is missing; install ibverbs-providers" >&2; exit 3; }

mkdir -p "$cache"
pkg=${RDMA_GUEST_KERNEL:-}
if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "rdma-guest: cannot resolve linux-image-amd64 (run apt-get update, or set RDMA_GUEST_KERNEL)" >&2; exit 3; }
fi
kver=${pkg#linux-image-}
deb=$(ls "$cache"/"$pkg"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    (cd "$cache" && apt-get download "$pkg" >/dev/null 2>&1) \
        || { echo "rdma-guest: apt-get download $pkg failed" >&2; exit 3; }
    deb=$(ls "$cache"/"$pkg"_*.deb | head -n1)
fi
kroot=$cache/kernel-$kver
if [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
    rm -rf "$kroot.tmp"
    dpkg-deb -x "$deb" "$kroot.tmp"
    depmod -b "$kroot.tmp" "$kver"
    mv "$kroot.tmp" "$kroot"
fi
moddir=$kroot/lib/modules/$kver

# The guest's root: a fresh directory per run (the caller's binaries change between runs).
root=$(mktemp -d "$cache/root.XXXXXX")
cleanup() { rm -rf "$root" "$root.cpio"; }
trap cleanup EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc/libibverbs.d,lib/modules,usr/lib/x86_64-linux-gnu/libibverbs}
cp "$busybox_bin" "$root/bin/busybox"

copy_with_libs() {
    local bin=$1 dest=$2
    cp -L "$bin" "$dest"
    ldd "$bin" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
}
for b in rdma ip ibv_devices ibv_devinfo ibv_rc_pingpong; do
    p=$(command -v "$b" || true)
    [ -n "$p" ] && copy_with_libs "$p" "$root/bin/$b"
done
for b in "${extra[@]}"; do
    [ -x "$b" ] || { echo "rdma-guest: $b is not an executable file" >&2; exit 2; }
    copy_with_libs "$b" "$root/bin/$(basename "$b")"
done
copy_with_libs "$rxe_provider" "$root/usr/lib/x86_64-linux-gnu/libibverbs/$(basename "$rxe_provider")"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"

# Kernel modules in load order (modules.dep lists a module's dependencies deepest last).
order=()
add_module() {
    local rel=$1 line i
    for m in "${order[@]:-}"; do [ "$m" = "$rel" ] && return 0; done
    line=$(grep -E "^$rel:" "$moddir/modules.dep") || { echo "rdma-guest: $rel not in modules.dep" >&2; exit 3; }
    local deps=(${line#*:})
    for (( i=${#deps[@]}-1; i>=0; i-- )); do add_module "${deps[$i]}"; done
    order+=("$rel")
}
for name in crc32_generic dummy ib_core ib_uverbs rdma_rxe; do
    rel=$(grep -oE "^[^:]*/$name\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -n1 | tr -d :)
    [ -n "$rel" ] || { echo "rdma-guest: module $name not found in $pkg" >&2; exit 3; }
    add_module "$rel"
done
: > "$root/modules.order"
for rel in "${order[@]}"; do
    base=$(basename "$rel")
    case $base in
        *.ko.xz) xz -dc "$moddir/$rel" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$moddir/$rel" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
        *) cp "$moddir/$rel" "$root/lib/modules/$base" ;;
    esac
    echo "$base" >> "$root/modules.order"
done

printf '%s\n' "$*" > "$root/cmd"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "rdma-guest: insmod $m failed"; done
ip link set lo up
ip link add dummy0 type dummy
ip addr add 10.55.0.1/24 dev dummy0
ip link set dummy0 up
rdma link add rxe0 type rxe netdev dummy0 || echo "rdma-guest: rdma link add rxe0 failed"
cd /tmp
echo ==RDMA-GUEST-BEGIN==
sh /cmd
echo "==RDMA-GUEST-END== rc=$?"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$root.cpio"

accel=tcg cpu=max
if [ -n "${RDMA_GUEST_KVM:-}" ]; then accel=kvm cpu=host,-arch-capabilities; fi
log=$(mktemp "$cache/console.XXXXXX")
set +e
timeout "$timeout_s" qemu-system-x86_64 -machine "accel=$accel" -cpu "$cpu" -m 1024 -smp 2 \
    -nographic -no-reboot -nic none \
    -kernel "$kroot/boot/vmlinuz-$kver" -initrd "$root.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1" > "$log" 2>&1
qrc=$?
set -e
tr -d '\r' < "$log" | sed -n '/^==RDMA-GUEST-BEGIN==/,/^==RDMA-GUEST-END==/p'
rc=$(tr -d '\r' < "$log" | sed -n 's/^==RDMA-GUEST-END== rc=\([0-9]*\)$/\1/p' | tail -n1)
if [ -z "$rc" ]; then
    echo "rdma-guest: the guest did not finish its command (qemu exit $qrc); console log:" >&2
    tr -d '\r' < "$log" | tail -n 40 >&2
    rm -f "$log"
    exit 4
fi
rm -f "$log"
exit "$rc"
