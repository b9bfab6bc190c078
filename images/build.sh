#!/usr/bin/env bash
# Builds the guest images into images/out/ (gitignored):
#   out/testguest.elf               the test guest (images/testguest, a PVH ELF)
#   out/linux/bzImage               Debian's cloud kernel (for hardware-KVM hosts)
#   out/linux/vmlinux               the PVH ELF inside that bzImage
#   out/linux/initramfs.cpio.gz     busybox, virtio modules, guest agent, test programs, /init
#   out/linux/nested-host.cpio.gz   the nested KVM test host's root (tests/nested.sh)
#   out/linux/{version,config,modules,System.map}  kernel release, .config, modules in load order, symbols
# Idempotent: a second run with nothing changed takes seconds.
#
# usage: images/build.sh [--testguest-only]
#   LINUX_IMAGE_PKG=linux-image-6.1.0-NN-cloud-amd64  pins the kernel package (default: what
#   linux-image-cloud-amd64 depends on).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
out=$here/out

testguest_only=0
for arg in "$@"; do
    case "$arg" in
        --testguest-only) testguest_only=1 ;;
        -h | --help)
            sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build.sh: unknown argument: $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { echo "build.sh: $*" >&2; }
die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

# need TOOL:PACKAGE... — fails naming every missing Debian package at once.
need() {
    local missing=() spec
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
    done
    if ((${#missing[@]})); then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        die "missing host tools; install them with: apt-get install ${missing[*]}" \
            "(all build/test host packages: images/host-packages.txt)"
    fi
}

# install_if_changed SRC DST — copies only when the content differs (keeps DST's mtime otherwise).
install_if_changed() {
    if [[ -f $2 ]] && cmp -s "$1" "$2"; then
        return 1
    fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp"
    mv -f "$2.tmp" "$2"
}

mkdir -p "$out"

# ---------------------------------------------------------------------------------------------
# 1. The test guest (its own cargo project: its .cargo/config.toml is found from its directory).
# ---------------------------------------------------------------------------------------------
build_testguest() {
    need cargo:cargo
    [[ -f $here/testguest/Cargo.toml ]] || die "images/testguest/Cargo.toml not found"
    log "test guest: cargo build --release (images/testguest)"
    (cd "$here/testguest" && cargo build --release --quiet)
    local elf=$here/testguest/target/release/testguest
    [[ -f $elf ]] || die "cargo did not produce $elf"
    if install_if_changed "$elf" "$out/testguest.elf"; then
        log "test guest: updated out/testguest.elf ($(stat -c %s "$out/testguest.elf") bytes)"
    else
        log "test guest: out/testguest.elf up to date"
    fi
}

# ---------------------------------------------------------------------------------------------
# 2. The Linux guest, from Debian packages only.
# ---------------------------------------------------------------------------------------------

# Modules the guest loads, in this order; their dependencies (from each .ko's modinfo) are added
# ahead of them automatically.
linux_modules=(
    virtio_ring virtio virtio_mmio
    virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    failover net_failover virtio_net
    virtio_blk
    virtio_console
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
)

# The nested test host (tests/nested.sh; docs/testing.md): this same kernel as an L1 KVM host under
# QEMU's TCG with SVM. Its modules: virtio-pci disks (the workspace image), KVM, and what network
# tests build (TAP, bridges, veth), loop devices. ext4 is built in.
nested_host_modules=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
    failover net_failover virtio_net
    irqbypass kvm kvm_amd
    tun bridge veth loop
)
# Host tools the tests run inside it, copied from this (Debian) host with their libraries.
nested_host_programs=(ip mkfs.ext4 e2fsck debugfs)

# fetch_deb PACKAGE — prints the path of PACKAGE's .deb in out/debs, downloading it if needed.
fetch_deb() {
    local pkg=$1 debs=$out/debs uri name size have
    mkdir -p "$debs"
    # "'URL' FILENAME SIZE HASH": tells the exact file apt would fetch, without fetching it.
    if uri=$(apt-get download --print-uris "$pkg" 2>/dev/null) && [[ -n $uri ]]; then
        read -r _ name size _ <<<"$uri"
        if [[ -f $debs/$name ]] && [[ $(stat -c %s "$debs/$name") == "$size" ]]; then
            echo "$debs/$name"
            return
        fi
        log "linux: apt-get download $pkg"
        local apt_opts=()
        # As root apt drops to the _apt user, which may not be able to write here.
        ((EUID == 0)) && apt_opts=(-o APT::Sandbox::User=root)
        if ! (cd "$debs" && apt-get download "${apt_opts[@]}" -q "$pkg" >&2); then
            die "'apt-get download $pkg' failed: this needs a Debian 12 (bookworm) apt source" \
                "reachable from this machine (try 'apt-get update')"
        fi
        [[ -f $debs/$name ]] || die "apt-get download $pkg did not produce $debs/$name"
        echo "$debs/$name"
        return
    fi
    # apt does not know the package (no index?): fall back to a cached copy.
    have=$(ls -1t "$debs/${pkg}_"*.deb 2>/dev/null | head -n 1 || true)
    [[ -n $have ]] || die "apt cannot resolve package $pkg and out/debs has no copy of it" \
        "(is this Debian 12 with a working apt source? try 'apt-get update')"
    log "linux: warning: apt cannot resolve $pkg; using cached $(basename "$have")"
    echo "$have"
}

resolve_kernel_pkg() {
    if [[ -n ${LINUX_IMAGE_PKG:-} ]]; then
        echo "$LINUX_IMAGE_PKG"
        return
    fi
    local dep
    dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p')
    dep=${dep%%$'\n'*}
    if [[ -z $dep ]]; then
        # No apt index: reuse the newest cached kernel package, if any.
        dep=$(ls -1t "$out/debs/"linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -n 1 || true)
        dep=$(basename "${dep%%_*}" 2>/dev/null || true)
        [[ -n $dep ]] || die "cannot resolve linux-image-cloud-amd64 with apt-cache" \
            "(needs Debian 12 bookworm apt sources; try 'apt-get update')"
    fi
    echo "$dep"
}

# extract_vmlinux BZIMAGE OUT — the bzImage payload (LZ4, legacy frame + 4-byte size trailer).
extract_vmlinux() {
    local bz=$1 dst=$2 setup_sects payload_offset payload_length start
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    ((setup_sects == 0)) && setup_sects=4
    payload_offset=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    payload_length=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
    start=$(((setup_sects + 1) * 512 + payload_offset))
    # bytes OFFSET COUNT — COUNT bytes of the bzImage from OFFSET (no SIGPIPE-prone pipelines).
    bytes() { dd if="$bz" iflag=skip_bytes,count_bytes skip="$1" count="$2" bs=1M status=none; }
    local magic want
    magic=$(bytes "$start" 4 | od -An -tx1 | tr -d ' \n')
    [[ $magic == 02214c18 ]] || die "bzImage payload at $start is not LZ4 (magic $magic)"
    # The last 4 bytes are the decompressed size, which lz4 would read as a bad frame.
    bytes "$start" $((payload_length - 4)) | lz4 -dc -q >"$dst.tmp" ||
        die "lz4 could not decompress the bzImage payload"
    want=$(bytes $((start + payload_length - 4)) 4 | od -An -tu4 | tr -d ' ')
    [[ $(stat -c %s "$dst.tmp") == "$want" ]] || die "vmlinux is $(stat -c %s "$dst.tmp") bytes, expected $want"
    mv -f "$dst.tmp" "$dst"
}

# The PVH entry note: owner "Xen", type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
check_pvh_note() {
    local notes
    notes=$(readelf -n "$1")
    grep -Eq '^[[:space:]]*Xen[[:space:]]+0x[0-9a-f]+[[:space:]]+(.*\(0x00000012\)|XEN_ELFNOTE_PHYS32_ENTRY)' <<<"$notes" ||
        die "$1 has no Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12)"
    [[ $(file -b "$1") == 'ELF 64-bit LSB executable, x86-64'* ]] || die "$1 is not an x86-64 ELF executable"
}

# The guest-agent crate's static binaries: the agent and the memory checker Linux tests run.
build_guest_agent() {
    need cargo:cargo file:file strip:binutils
    log "guest agent: cargo build (static)"
    (cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --quiet -p guest-agent --target x86_64-unknown-linux-gnu)
    local name bin kind
    for name in vmm-guest-agent vmm-memcheck vmm-tcpcheck; do
        bin=$root/target/x86_64-unknown-linux-gnu/release/$name
        kind=$(file -L -b "$bin")
        [[ $kind == *'statically linked'* || $kind == *'static-pie linked'* ]] ||
            die "$bin is not statically linked: $kind"
        strip -o "$out/$name.stripped" "$bin"
        install_if_changed "$out/$name.stripped" "$out/$name" || true
        rm -f "$out/$name.stripped"
    done
}

# unpack_debs KDEB BBDEB WORK — the kernel and busybox packages, unpacked once per build.
unpack_debs() {
    rm -rf "$3"
    mkdir -p "$3"
    dpkg-deb -x "$1" "$3/kernel"
    dpkg-deb -x "$2" "$3/busybox"
    kver=$(basename "$(ls -d "$3/kernel/lib/modules/"*)")
    kmods=$3/kernel/lib/modules/$kver
    bb=$3/busybox/bin/busybox
}

# busybox_rootfs ROOTFS — a root tree with busybox and a symlink for each applet.
busybox_rootfs() {
    local rootfs=$1 applet
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,run,root,mnt}
    cp "$bb" "$rootfs/bin/busybox"
    while read -r applet; do
        [[ $applet == bin/busybox ]] && continue
        mkdir -p "$rootfs/$(dirname "$applet")"
        ln -sf /bin/busybox "$rootfs/$applet"
    done < <("$bb" --list-full)
    [[ -L $rootfs/bin/sh ]] || die "busybox has no sh applet"
    echo "root:x:0:0:root:/root:/bin/sh" >"$rootfs/etc/passwd"
    echo "root:x:0:" >"$rootfs/etc/group"
}

# install_modules ROOTFS MODULE... — MODULE and its dependencies (each .ko's modinfo), decompressed,
# with modules.dep; /etc/vmm-modules lists them in load order for /init.
install_modules() {
    local rootfs=$1 work
    shift
    work=$(dirname "$rootfs")
    declare -A modfile=() visited=()
    local f n order=()
    while read -r f; do
        n=$(basename "$f")
        n=${n%%.ko*}
        modfile[${n//-/_}]=$f
    done < <(find "$kmods/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')

    # modinfo_depends FILE — the "depends=" field of a (possibly compressed) module.
    modinfo_depends() {
        local tmp=$work/modinfo.ko
        case "$1" in
            *.ko) cp "$1" "$tmp" ;;
            *.ko.xz) need xz:xz-utils && xz -dc "$1" >"$tmp" ;;
            *.ko.zst) need zstd:zstd && zstd -qdc "$1" >"$tmp" ;;
            *.ko.gz) gzip -dc "$1" >"$tmp" ;;
        esac
        readelf -p .modinfo "$tmp" | sed -n 's/.*depends=\(.*\)$/\1/p' | tr ',' ' '
    }
    visit() {
        local m=$1 d deps
        [[ -n ${visited[$m]:-} ]] && return
        visited[$m]=1
        [[ -n ${modfile[$m]:-} ]] || die "kernel module $m not found in the $kver package"
        deps=$(modinfo_depends "${modfile[$m]}")
        for d in $deps; do
            visit "$d"
        done
        order+=("$m")
    }
    for n in "$@"; do
        visit "$n"
    done

    local rel target
    : >"$rootfs/etc/vmm-modules"
    for n in "${order[@]}"; do
        f=${modfile[$n]}
        rel=${f#"$kmods/"}
        target=$rootfs/lib/modules/$kver/${rel%.ko*}.ko
        mkdir -p "$(dirname "$target")"
        case "$f" in
            *.ko) cp "$f" "$target" ;;
            *.ko.xz) xz -dc "$f" >"$target" ;;
            *.ko.zst) zstd -qdc "$f" >"$target" ;;
            *.ko.gz) gzip -dc "$f" >"$target" ;;
        esac
        echo "$n" >>"$rootfs/etc/vmm-modules"
        echo "${rel%.ko*}.ko" >>"$rootfs/lib/modules/$kver/modules.order"
    done
    # modules.builtin* let modprobe treat built-in drivers as present; modules.order lists ours.
    cp "$kmods/modules.builtin" "$kmods/modules.builtin.modinfo" "$rootfs/lib/modules/$kver/"
    # The .deb ships no modules.dep. kmod's depmod if the host has it, else busybox's own.
    if command -v depmod >/dev/null 2>&1; then
        depmod -b "$rootfs" "$kver"
    else
        "$bb" depmod -b "$rootfs" "$kver"
    fi
    [[ -s $rootfs/lib/modules/$kver/modules.dep ]] || die "depmod wrote no modules.dep"
}

# pack_initramfs ROOTFS DST — a reproducible newc archive: sorted names, fixed mtimes, root-owned.
pack_initramfs() {
    local epoch=${SOURCE_DATE_EPOCH:-0}
    find "$1" -exec touch -h -d "@$epoch" {} +
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$2.tmp"
    mv -f "$2.tmp" "$2"
}

# install_host_program ROOTFS PROGRAM... — host programs (from Debian packages) with every shared
# library ldd names, at the same paths, so they run in the nested host's initramfs.
install_host_program() {
    local rootfs=$1 prog path lib
    shift
    for prog in "$@"; do
        path=$(command -v "$prog") || die "host program $prog not found (images/host-packages.txt)"
        path=$(readlink -f "$path")
        mkdir -p "$rootfs/usr/sbin"
        rm -f "$rootfs/usr/sbin/$prog" "$rootfs/sbin/$prog" "$rootfs/bin/$prog" "$rootfs/usr/bin/$prog"
        cp "$path" "$rootfs/usr/sbin/$prog"
        while read -r lib; do
            [[ -e $rootfs$lib ]] && continue
            mkdir -p "$rootfs$(dirname "$lib")"
            cp -L "$lib" "$rootfs$lib"
        done < <(ldd "$path" | grep -o '/[^ ]*' || true)
    done
}

build_linux() {
    need apt-get:apt apt-cache:apt dpkg-deb:dpkg lz4:lz4 cpio:cpio gzip:gzip file:file \
        readelf:binutils od:coreutils find:findutils sha256sum:coreutils ldd:libc-bin

    build_guest_agent

    local kpkg kdeb bbdeb
    kpkg=$(resolve_kernel_pkg)
    kdeb=$(fetch_deb "$kpkg")
    bbdeb=$(fetch_deb busybox-static)

    local dst=$out/linux stamp=$out/linux/.stamp fingerprint
    fingerprint=$(
        cd "$root"
        echo "kernel package: $kpkg"
        echo "modules: ${linux_modules[*]}"
        echo "depmod: $(command -v depmod || echo busybox)"
        echo "nested host: ${nested_host_modules[*]} / ${nested_host_programs[*]}"
        dpkg-query -W iproute2 e2fsprogs libc6 2>/dev/null || true
        sha256sum "$kdeb" "$bbdeb" "$out/vmm-guest-agent" "$out/vmm-memcheck" "$out/vmm-tcpcheck" images/build.sh \
            images/linux/init images/linux/vmm-* images/nested-host/init
    )
    if [[ -f $stamp ]] && [[ $(cat "$stamp") == "$fingerprint" ]] &&
        [[ -f $dst/bzImage && -f $dst/vmlinux && -f $dst/initramfs.cpio.gz && -f $dst/nested-host.cpio.gz ]]; then
        log "linux: out/linux up to date ($kpkg)"
        return
    fi
    log "linux: building from $(basename "$kdeb") and $(basename "$bbdeb")"
    rm -f "$stamp"

    local work=$out/linux-work kver kmods bb
    unpack_debs "$kdeb" "$bbdeb" "$work"
    mkdir -p "$dst"
    local vmlinuz=$work/kernel/boot/vmlinuz-$kver
    [[ -f $vmlinuz ]] || die "no vmlinuz-$kver in $(basename "$kdeb")"

    # Kernel images.
    cp "$vmlinuz" "$dst/bzImage.tmp" && mv -f "$dst/bzImage.tmp" "$dst/bzImage"
    extract_vmlinux "$dst/bzImage" "$dst/vmlinux"
    check_pvh_note "$dst/vmlinux"
    cp "$work/kernel/boot/config-$kver" "$dst/config"
    cp "$work/kernel/boot/System.map-$kver" "$dst/System.map"
    echo "$kver" >"$dst/version"

    # The guest's initramfs.
    local rootfs=$work/rootfs script
    busybox_rootfs "$rootfs"
    install -m 0755 "$root/images/linux/init" "$rootfs/init"
    for script in "$root"/images/linux/vmm-*; do
        install -m 0755 "$script" "$rootfs/usr/bin/$(basename "$script")"
    done
    install -m 0755 "$out/vmm-guest-agent" "$rootfs/usr/bin/vmm-guest-agent"
    install -m 0755 "$out/vmm-memcheck" "$rootfs/usr/bin/vmm-memcheck"
    install -m 0755 "$out/vmm-tcpcheck" "$rootfs/usr/bin/vmm-tcpcheck"
    install_modules "$rootfs" "${linux_modules[@]}"
    cp "$rootfs/etc/vmm-modules" "$dst/modules"
    pack_initramfs "$rootfs" "$dst/initramfs.cpio.gz"

    # The nested test host's initramfs (tests/nested.sh): the same kernel runs as a KVM host.
    local host=$work/nested-host
    busybox_rootfs "$host"
    install -m 0755 "$root/images/nested-host/init" "$host/init"
    install_host_program "$host" "${nested_host_programs[@]}"
    install_modules "$host" "${nested_host_modules[@]}"
    pack_initramfs "$host" "$dst/nested-host.cpio.gz"

    rm -rf "$work"
    echo "$fingerprint" >"$stamp"
    log "linux: $kver: bzImage $(stat -c %s "$dst/bzImage"), vmlinux $(stat -c %s "$dst/vmlinux")," \
        "initramfs.cpio.gz $(stat -c %s "$dst/initramfs.cpio.gz")," \
        "nested-host.cpio.gz $(stat -c %s "$dst/nested-host.cpio.gz") bytes"
}

build_testguest
if ((testguest_only)); then
    exit 0
fi
build_linux
log "done: images in ${out#"$root/"}/"
