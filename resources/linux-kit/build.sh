#!/usr/bin/env bash
# Builds (or finds in the cache) the Linux guest kit and prints the kit's directory on stdout
# (progress goes to stderr).
#
#   resources/linux-kit/build.sh stock    Debian's own cloud kernel, unmodified
#   resources/linux-kit/build.sh test     the Linux test kernel, built from linux-source-6.1
#
# "stock": the package that linux-image-cloud-amd64 depends on, fetched with apt-get download
# and unpacked with dpkg-deb. The kit folder holds:
#   vmlinuz            the bzImage as Debian ships it
#   vmlinux            the ELF kernel inside it (its LZ4 payload, decompressed), which boots much
#                      faster under emulation because the decompressor does not run in the guest
#   config             the kernel's config, for reference
#   initramfs.cpio  busybox-static, the guest agent, and the module files virtio_ring, virtio,
#                      virtio_mmio, virtio_blk, vsock, vmw_vsock_virtio_transport_common and
#                      vmw_vsock_virtio_transport, which /init loads in that order
#   cmdline.txt        the command line to boot it with
#
# "test": the Linux test kernel of DESIGN.md, built from Debian's linux-source-6.1 with
# test-kernel.config (a fragment over `make tinyconfig`) and patches/*.patch (three changes for
# PVM hosts, each off unless switched on from the command line: strata.pvm turns all three on,
# strata.pvm_no_int3_selftest, strata.pvm_no_fwait and strata.pvm_syscall_fault one each). The
# kit folder holds vmlinux (boot this one on PVM), bzImage, config, initramfs.cpio (busybox
# and the agent, no modules) and cmdline.txt (the PVM command line of ../../../shared/PVM.md).
# The kernel build takes 4-7 minutes on 2 shared cores; STRATA_KIT_JOBS sets make's -j (default 2).
#
# The initramfs's /init mounts proc, sys, devtmpfs and a tmpfs on /tmp, starts
# /sbin/strata-guest-agent in the background (vsock port 52) when the kit has it, prints
# `strata-linux-ready` on the console and runs a shell there (again whenever it exits).
#
# The kit lives in $STRATA_KIT_CACHE (default ~/.cache/strata/kit), in folders keyed by what
# went into them (package versions; hashes of this script, the config, the patches and the
# agent's sources), so a machine that already built it (a CI machine running the suite again)
# reuses it in seconds, and any change to an input rebuilds what depends on it.
# The guest agent is built with resources/guest-agent/build-static.sh when that exists; set
# STRATA_KIT_NO_AGENT=1 to leave it out. Missing tools and packages are installed with apt-get,
# which needs root.
set -euo pipefail

what=${1:-}
case $what in
    stock | test) ;;
    *)
        echo "usage: $0 stock|test" >&2
        exit 2
        ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${STRATA_KIT_CACHE:-${HOME:-/root}/.cache/strata/kit}
self_hash=$(sha256sum "$0" | cut -c1-12)
mkdir -p "$cache"
# One build at a time per cache (tests that boot Linux run in parallel and all call this).
exec 9>"$cache/.lock"
flock 9

log() { echo "linux-kit: $*" >&2; }
die() {
    log "$*"
    exit 1
}

apt_updated=
apt_update_once() {
    if [ -z "$apt_updated" ]; then
        log "running apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

# Installs the packages among "$@" that are not installed yet.
need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
}

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'; }

# Fetches busybox-static once per version; prints the binary's path.
busybox_binary() {
    local version dir work
    version=$(candidate busybox-static)
    if [ -z "$version" ] || [ "$version" = "(none)" ]; then
        apt_update_once
        version=$(candidate busybox-static)
    fi
    [ -n "$version" ] && [ "$version" != "(none)" ] || die "no busybox-static package"
    dir="$cache/busybox-static-${version//:/_}"
    if [ ! -x "$dir/busybox" ]; then
        log "fetching busybox-static $version"
        work=$(mktemp -d)
        (cd "$work" && { apt-get download "busybox-static=$version" >&2 2>/dev/null ||
            apt-get download busybox-static >&2; })
        dpkg-deb -x "$work"/busybox-static_*.deb "$work/x"
        mkdir -p "$dir"
        cp "$work/x/bin/busybox" "$dir/busybox.tmp"
        mv "$dir/busybox.tmp" "$dir/busybox"
        rm -rf "$work"
    fi
    echo "$dir/busybox"
}

# A hash of the agent's sources ("none" when the kit goes without the agent).
agent_key() {
    local src="$repo/resources/guest-agent"
    if [ -n "${STRATA_KIT_NO_AGENT:-}" ] || [ ! -f "$src/build-static.sh" ]; then
        echo none
        return
    fi
    (
        cd "$repo"
        find resources/guest-agent -type f -not -path '*/target/*' | LC_ALL=C sort | xargs sha256sum
        sha256sum Cargo.lock Cargo.toml 2>/dev/null || true
    ) | sha256sum | cut -c1-12
}

# Builds the static agent once per source hash; prints its path (or nothing without it).
agent_binary() {
    local key=$1 dir
    [ "$key" = none ] && return 0
    dir="$cache/agent-$key"
    if [ ! -x "$dir/strata-guest-agent" ]; then
        log "building the static guest agent"
        command -v cargo >/dev/null || die "cargo is needed to build the guest agent (or set STRATA_KIT_NO_AGENT=1)"
        mkdir -p "$dir.tmp"
        sh "$repo/resources/guest-agent/build-static.sh" "$dir.tmp" >/dev/null ||
            die "building the guest agent failed (set STRATA_KIT_NO_AGENT=1 to build the kit without it)"
        strip "$dir.tmp/strata-guest-agent" 2>/dev/null || true
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
    fi
    echo "$dir/strata-guest-agent"
}

# Writes /init into the staging folder $1.
write_init() {
    cat >"$1/init" <<'INIT'
#!/bin/sh
# Strata Linux guest kit: /init (busybox sh).
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /mnt /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname strata-linux

# Module files (stock kernel only), in dependency order. Options given on the kernel command
# line as MODULE.PARAM=VALUE are not applied to modules loaded later with insmod, so they are
# passed here.
if [ -f /lib/modules/order ]; then
    while read -r mod; do
        name=${mod%.ko}
        key=$(echo "$name" | tr - _)
        opts=
        for word in $(cat /proc/cmdline); do
            case $word in
                "$key".*=* | "$name".*=*) opts="$opts ${word#*.}" ;;
            esac
        done
        # A module rejects the whole load for an option it does not know (Debian's virtio_mmio
        # has no "device" option, VIRTIO_MMIO_CMDLINE_DEVICES being off): retry without them.
        # shellcheck disable=SC2086
        insmod "/lib/modules/$mod" $opts 2>/dev/null ||
            insmod "/lib/modules/$mod" || echo "strata-init: insmod $mod failed"
    done </lib/modules/order
fi

# The agent's log goes to a file, not the console, which belongs to the shell.
if [ -x /sbin/strata-guest-agent ]; then
    /sbin/strata-guest-agent </dev/null >/run/strata-guest-agent.log 2>&1 &
fi

echo strata-linux-ready
while true; do
    setsid cttyhack sh -l
    echo "strata-init: the console shell exited; starting another"
done
INIT
    chmod 755 "$1/init"
}

# Packs the staging folder $1 (plus /dev/console) into the newc cpio $2 (uncompressed), owned by root,
# without needing root.
pack_cpio() {
    python3 - "$1" "$2" <<'PY'
import os, stat, sys

root, out = sys.argv[1], sys.argv[2]
ino = [1000]
chunks = []

def entry(name, mode, data=b"", rdev=(0, 0), nlink=1):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    hdr = "070701" + "".join("%08X" % v for v in (
        ino[0], mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
    b = hdr.encode() + name_b
    b += b"\0" * (-len(b) % 4)
    b += data + b"\0" * (-len(data) % 4)
    chunks.append(b)

entry("dev", stat.S_IFDIR | 0o755, nlink=2)
entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    rel_dir = os.path.relpath(dirpath, root)
    for name in sorted(dirnames) + sorted(filenames):
        path = os.path.join(dirpath, name)
        rel = os.path.normpath(os.path.join(rel_dir, name))
        if rel == "dev":
            continue
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            entry(rel, stat.S_IFDIR | (st.st_mode & 0o7777), nlink=2)
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                entry(rel, stat.S_IFREG | (st.st_mode & 0o7777), f.read())
entry("TRAILER!!!", 0)
# Uncompressed: on PVM the guest kernel runs at ~1M instructions/s, and unpacking busybox took
# ~50 s from a gzip -9 cpio, ~15 s from a stored (level 0) gzip and ~8 s from a plain cpio.
with open(out, "wb") as f:
    f.write(b"".join(chunks))
PY
}

BUSYBOX_LINKS="sh ash cat cp mv rm ln ls mkdir rmdir mount umount grep egrep sed awk echo printf
test [ [[ sync sleep dmesg poweroff reboot halt setsid cttyhack hostname insmod lsmod rmmod ps kill
mknod chmod chown touch dd head tail wc tr cut sort uniq uname id df du find xargs stat true false
env date stty tty vi less more hexdump od md5sum sha256sum fsfreeze nproc free top uptime which
basename dirname readlink realpath seq tee yes clear mountpoint blockdev losetup cmp diff gzip
gunzip tar watch time timeout nohup usleep pidof pgrep pkill killall fuser sysctl ifconfig ip"

# Builds the initramfs $1 with busybox, the agent ($2, may be empty) and the module files
# "${@:3}" (loaded in that order).
make_initramfs() {
    local out=$1 agent=$2 busybox stage applet
    shift 2
    busybox=$(busybox_binary)
    stage=$(mktemp -d)
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,proc,sys,tmp,mnt,run,root,etc/strata/hooks.d,lib/modules}
    cp "$busybox" "$stage/bin/busybox"
    # Links for the applets a shell user, /init and the tests need, not all ~400: every file of
    # the initramfs costs the emulated kernel time to unpack on PVM. Busybox's own shell runs any
    # other applet by name (`busybox APPLET` works everywhere).
    for applet in $("$busybox" --list-full); do
        case " $BUSYBOX_LINKS " in
            *" ${applet##*/} "*) [ -e "$stage/$applet" ] || ln -s /bin/busybox "$stage/$applet" ;;
        esac
    done
    [ -n "$agent" ] && cp "$agent" "$stage/sbin/strata-guest-agent"
    if [ $# -gt 0 ]; then
        local m
        for m in "$@"; do
            cp "$m" "$stage/lib/modules/"
            basename "$m" >>"$stage/lib/modules/order"
        done
    fi
    echo "root:x:0:0:root:/root:/bin/sh" >"$stage/etc/passwd"
    echo "root:x:0:" >"$stage/etc/group"
    write_init "$stage"
    pack_cpio "$stage" "$out"
    rm -rf "$stage"
}

# ---------------------------------------------------------------------------------------------
build_stock() {
    local pkg version out work offset akey agent kdir
    find_package() {
        apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
    }
    pkg=$(find_package || true)
    if [ -z "$pkg" ]; then
        log "apt lists are empty or stale: running apt-get update"
        apt_update_once
        pkg=$(find_package)
    fi
    [ -n "$pkg" ] || die "cannot find the package linux-image-cloud-amd64 depends on"
    version=$(candidate "$pkg")
    akey=$(agent_key)
    out="$cache/stock-$pkg-$version-$self_hash-agent-$akey"
    if [ -f "$out/.complete" ]; then
        echo "$out"
        return 0
    fi

    command -v lz4 >/dev/null || need_packages lz4
    command -v xz >/dev/null || need_packages xz-utils
    agent=$(agent_binary "$akey")

    work=$(mktemp -d)
    stock_work=$work
    trap 'rm -rf "${stock_work:-}"' EXIT
    log "fetching $pkg $version"
    (cd "$work" && { apt-get download "$pkg=$version" >&2 2>/dev/null || apt-get download "$pkg" >&2; })
    dpkg-deb -x "$work"/"$pkg"_*.deb "$work/x"

    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    cp "$work/x/boot/vmlinuz-"* "$out.tmp/vmlinuz"
    cp "$work/x/boot/config-"* "$out.tmp/config"
    # The bzImage's payload is a legacy-LZ4 stream (magic 02 21 4c 18) followed by padding.
    offset=$(python3 - "$out.tmp/vmlinuz" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
i = data.find(bytes([0x02, 0x21, 0x4C, 0x18]))
if i < 0:
    sys.exit("no LZ4 payload in the bzImage")
print(i)
PY
    )
    tail -c +"$((offset + 1))" "$out.tmp/vmlinuz" | lz4 -dc >"$out.tmp/vmlinux" 2>/dev/null || true
    head -c 4 "$out.tmp/vmlinux" | grep -q $'\x7fELF' || die "the unpacked vmlinux is not an ELF file"

    # The virtio and vsock modules, in load order (uncompressed: busybox insmod wants .ko).
    kdir=$(echo "$work"/x/lib/modules/*/kernel)
    local mods=() name f
    mkdir -p "$work/mods"
    for name in virtio_ring virtio virtio_mmio virtio_blk vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
        f=$(find "$kdir" -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" | head -n 1)
        if [ -z "$f" ]; then
            log "no module file for $name (built into this kernel?)"
            continue
        fi
        case $f in
            *.xz) xz -dc "$f" >"$work/mods/$name.ko" ;;
            *.zst) zstd -qdc "$f" >"$work/mods/$name.ko" ;;
            *) cp "$f" "$work/mods/$name.ko" ;;
        esac
        mods+=("$work/mods/$name.ko")
    done
    make_initramfs "$out.tmp/initramfs.cpio" "$agent" "${mods[@]}"
    echo "console=ttyS0" >"$out.tmp/cmdline.txt"
    touch "$out.tmp/.complete"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    log "kit ready in $out"
    echo "$out"
}

# ---------------------------------------------------------------------------------------------
# The command line the test kernel needs on a PVM host (PVM.md): CPU features the emulator
# refuses hidden from the kernel, and our three switches.
TEST_CMDLINE="console=ttyS0 noxsave clearcpuid=popcnt,rdrand,rdseed,smap,erms,fsrm,cx16 nofsgsbase rodata=off percpu_alloc=page quiet strata.pvm"

build_test_kernel() {
    # Prints the folder with the built kernel (vmlinux, bzImage, config).
    local src_version cfg_hash patch_hash recipe_hash key out work srcdir obj jobs p line k v start
    need_packages linux-source-6.1
    src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
    cfg_hash=$(sha256sum "$here/test-kernel.config" | cut -c1-12)
    patch_hash=$(cat /dev/null "$here"/patches/*.patch | sha256sum | cut -c1-12)
    # The recipe's hash is that of this function's text (not of the whole script), so that
    # changes to the initramfs part of the script do not rebuild the kernel.
    recipe_hash=$(declare -f build_test_kernel | sha256sum | cut -c1-12)
    key="$src_version-c$cfg_hash-p$patch_hash-s$recipe_hash"
    out="$cache/test-kernel-$key"
    if [ -f "$out/.complete" ]; then
        echo "$out"
        return 0
    fi
    need_packages build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils python3
    work="$cache/test-kernel-build"
    rm -rf "$work"
    mkdir -p "$work"
    start=$(date +%s)
    log "unpacking /usr/src/linux-source-6.1.tar.xz"
    tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
    srcdir=$(echo "$work"/linux-source-6.1)
    [ -d "$srcdir" ] || die "the source tarball has no linux-source-6.1 folder"
    for p in "$here"/patches/*.patch; do
        log "applying $(basename "$p")"
        patch -d "$srcdir" -p1 --quiet --forward <"$p" >&2 || die "patch $(basename "$p") does not apply"
    done
    obj="$work/obj"
    mkdir -p "$obj"
    make -s -C "$srcdir" O="$obj" tinyconfig >/dev/null
    "$srcdir/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$here/test-kernel.config" >/dev/null 2>&1 ||
        die "merge_config.sh failed"
    make -s -C "$srcdir" O="$obj" olddefconfig >/dev/null 2>&1
    # Every option of the fragment must have taken.
    while read -r line; do
        case $line in '' | '#'*) continue ;; esac
        k=${line%%=*}
        v=${line#*=}
        if [ "$v" = n ]; then
            ! grep -q "^$k=" "$obj/.config" || die "test-kernel.config: $k=n did not take ($(grep "^$k=" "$obj/.config"))"
        else
            grep -qxF "$line" "$obj/.config" || die "test-kernel.config: $line did not take"
        fi
    done <"$here/test-kernel.config"
    jobs=${STRATA_KIT_JOBS:-2}
    log "building the test kernel (nice make -j$jobs, ~10 minutes on 2 cores)"
    if ! nice -n 19 make -s -C "$srcdir" O="$obj" -j"$jobs" bzImage >"$work/build.log" 2>&1; then
        tail -n 40 "$work/build.log" >&2
        die "the kernel build failed (log: $work/build.log)"
    fi
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    cp "$obj/vmlinux" "$out.tmp/vmlinux"
    cp "$obj/arch/x86/boot/bzImage" "$out.tmp/bzImage"
    cp "$obj/.config" "$out.tmp/config"
    echo "$(($(date +%s) - start))" >"$out.tmp/build-seconds"
    touch "$out.tmp/.complete"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    rm -rf "$work"
    log "test kernel built in $(cat "$out/build-seconds") s"
    echo "$out"
}

build_test() {
    local kernel akey bb_version key out agent
    kernel=$(build_test_kernel)
    akey=$(agent_key)
    bb_version=$(candidate busybox-static)
    key=$(printf '%s\n' "$kernel" "$akey" "$bb_version" "$self_hash" | sha256sum | cut -c1-12)
    out="$cache/test-$(basename "$kernel" | sed 's/^test-kernel-//')-kit-$key"
    if [ -f "$out/.complete" ]; then
        echo "$out"
        return 0
    fi
    agent=$(agent_binary "$akey")
    rm -rf "$out.tmp"
    mkdir -p "$out.tmp"
    ln "$kernel/vmlinux" "$out.tmp/vmlinux" 2>/dev/null || cp "$kernel/vmlinux" "$out.tmp/vmlinux"
    ln "$kernel/bzImage" "$out.tmp/bzImage" 2>/dev/null || cp "$kernel/bzImage" "$out.tmp/bzImage"
    cp "$kernel/config" "$out.tmp/config"
    make_initramfs "$out.tmp/initramfs.cpio" "$agent"
    echo "$TEST_CMDLINE" >"$out.tmp/cmdline.txt"
    touch "$out.tmp/.complete"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    log "kit ready in $out"
    echo "$out"
}

"build_$what"
