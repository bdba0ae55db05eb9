#!/usr/bin/env bash
# Builds the cairn A/B disk image from Debian bookworm packages plus this workspace's release binaries.
# No mounts (the build host cannot mount vfat or use device-mapper): the root is an erofs file with a
# dm-verity hash tree, the ESP a vfat file filled with mtools, and sfdisk lays them into a GPT file.
# Same inputs → same bytes: fixed UUIDs, salts and timestamps (SOURCE_DATE_EPOCH).
#
#   image/build.sh --version 1.0.0 --out DIR [--fleet-ca PEM] [--fleet-url URL] [--workload-signer PUB]
#                  [--bin DIR] [--fleet-bin FILE] [--cache DIR] [--config TOML]... [--update-root JSON]
#                  [--extra-packages PKG,PKG]  (more Debian packages in the root; another cached base)
#                  (each --config file is appended to the image's /usr/lib/cairn/cairnd.toml)
#   image/build.sh --base-only [--cache DIR]      (only build and cache the Debian base tree)
#
# Writes DIR/cairn-VERSION.img (the whole disk, sparse), DIR/cairn-VERSION.root.erofs, .root.verity, .vmlinuz
# and .initrd (what an update writes: `cairn-fleet update publish`), DIR/cairn-VERSION.roothash, DIR/cairn-VERSION.json
# (the manifest: sizes, SHA-256s, root hash, partition layout) and DIR/cairn-VERSION.reference-measurements.json
# (PCR 4 of a good boot, from `cairn-fleet reference`: what `cairn-fleet serve --reference` attests devices against).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

version="" out="" fleet_ca="" fleet_url="" signer="" configs=() base_only="" update_root="" extra_packages=""
bin="$repo/target/release" cache="$repo/target/image-cache" fleet_bin="$repo/target/debug/cairn-fleet"
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --fleet-ca) fleet_ca=$2; shift 2 ;;
        --fleet-url) fleet_url=$2; shift 2 ;;
        --workload-signer) signer=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --fleet-bin) fleet_bin=$2; shift 2 ;;
        --cache) cache=$2; shift 2 ;;
        --config) configs+=("$2"); shift 2 ;;
        --update-root) update_root=$2; shift 2 ;;
        --extra-packages) extra_packages=$2; shift 2 ;;
        --base-only) base_only=1; shift ;;
        *) echo "image/build.sh: unknown argument $1; see the comment at the top of $0" >&2; exit 2 ;;
    esac
done
die() { echo "image/build.sh: $*" >&2; exit 1; }
if [ -z "$base_only" ]; then
    [ -n "$version" ] || die "--version is required (e.g. --version 1.0.0)"
    [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "version $version is not MAJOR.MINOR.PATCH"
    [ -n "$out" ] || die "--out DIR is required"
    for b in cairnd cairnctl cairn-console; do
        [ -x "$bin/$b" ] || die "$bin/$b is missing: build it first (cargo build --release --locked)"
    done
    [ -x "$fleet_bin" ] || die "$fleet_bin is missing (it computes the reference measurements): build it first (cargo build --locked -p cairn-fleet) or give --fleet-bin"
fi
for t in mmdebstrap mkfs.erofs veritysetup mkfs.vfat mcopy mmd sfdisk; do
    command -v "$t" >/dev/null || die "$t is missing: run \`just deps-image\`"
done
[ "$(id -u)" -eq 0 ] || die "mmdebstrap needs root here; run as root"

export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1767225600} # 2026-01-01, unless the caller pins another
mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/tmp}/cairn-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. The Debian tree, cached by the package list and the hook below (which decide its contents).
packages="systemd,systemd-sysv,udev,dbus,kmod,linux-image-cloud-amd64,dracut,systemd-boot,tpm2-tools,e2fsprogs,cryptsetup-bin,libtss2-esys-3.0.2-0,libtss2-tctildr0,libtss2-mu0,libtss2-rc0,libzstd1,iproute2${extra_packages:+,$extra_packages}"
dracut_conf='hostonly="no"
add_dracutmodules+=" systemd systemd-veritysetup dm "
add_drivers+=" virtio_blk virtio_pci virtio_scsi nvme erofs dm-verity tpm_crb tpm_tis "
compress="zstd"'
key=$(printf '%s\n%s\n' "$packages" "$dracut_conf" | sha256sum | cut -c1-16)
base="$cache/base-$key"
if [ ! -f "$base.ready" ]; then
    echo "image: building the Debian base tree (once per package list; about 90 s)" >&2
    rm -rf "$base"
    printf '%s\n' "$dracut_conf" > "$work/dracut.conf"
    mmdebstrap --variant=minbase --quiet --include="$packages" \
        --customize-hook="cp $work/dracut.conf \"\$1/etc/dracut.conf.d/50-cairn.conf\"" \
        --customize-hook='chroot "$1" sh -c "dracut --force --kver \$(ls /usr/lib/modules) /boot/initrd.img-\$(ls /usr/lib/modules) >/dev/null 2>&1"' \
        --customize-hook='rm -rf "$1/var/cache/apt/"* "$1/var/lib/apt/lists/"* "$1/var/log/"*' \
        bookworm "$base"
    touch "$base.ready"
fi
[ -z "$base_only" ] || { echo "image: base tree $base" >&2; exit 0; }
mkdir -p "$out"
out=$(cd "$out" && pwd)

# 2. This version's tree: the base plus cairn.
tree="$work/tree"
cp -a "$base" "$tree"
kver=$(ls "$tree/usr/lib/modules")
install -m 0755 "$bin/cairnd" "$bin/cairnctl" "$bin/cairn-console" "$tree/usr/bin/"
install -d "$tree/usr/lib/cairn" "$tree/usr/share/doc/cairn"
cp -r "$here/rootfs/." "$tree/"
install -m 0644 "$repo/agent/dist/cairnd.service" "$tree/usr/lib/systemd/system/cairnd.service"
cp "$repo/docs/"*.md "$tree/usr/share/doc/cairn/"
cp -r "$repo/docs/runbooks" "$tree/usr/share/doc/cairn/"
{
    echo "# cairn image defaults (layer 2: /usr/lib); the site overrides them in /etc/cairn/cairnd.toml."
    echo "[agent]"
    echo 'data_dir = "/var/lib/cairn"'
    echo "[tpm]"
    echo 'tcti = "device:/dev/tpmrm0"'
    echo "[fleet]"
    echo 'ca_file = "/usr/lib/cairn/fleet-ca.pem"'
    # A mounted stick first, then a file ops put on the ESP before shipping (/efi is where the image mounts it).
    echo 'provisioning_paths = ["/run/cairn/provision/cairn-provision.toml", "/efi/cairn-provision.toml"]'
    [ -z "$fleet_url" ] || echo "url = \"$fleet_url\""
    [ -z "$signer" ] || { echo "[workloads]"; echo 'signer_key = "/usr/lib/cairn/workload-signer.pub"'; }
    for c in "${configs[@]}"; do cat "$c"; done
} > "$tree/usr/lib/cairn/cairnd.toml"
[ -z "$fleet_ca" ] || install -m 0644 "$fleet_ca" "$tree/usr/lib/cairn/fleet-ca.pem"
[ -z "$signer" ] || install -m 0644 "$signer" "$tree/usr/lib/cairn/workload-signer.pub"
# The update channel's trust anchor (`cairn-fleet update init`); without it the image takes no updates.
[ -z "$update_root" ] || install -m 0644 "$update_root" "$tree/usr/lib/cairn/update-root.json"
cat >> "$tree/usr/lib/os-release" <<EOF
IMAGE_ID=cairn
IMAGE_VERSION=$version
EOF
# A read-only root: machine-id is made at boot (empty file → transient id), /etc/cairn lives on the data partition.
: > "$tree/etc/machine-id"
rm -rf "$tree/etc/cairn"
ln -s /var/lib/cairn/etc "$tree/etc/cairn"
# The gate runs on every boot (multi-user.target); boot-complete.target, which exists only while a boot is being
# assessed (boot counting), also requires it, so only a passing gate blesses a new entry.
for link in multi-user.target.wants/cairnd.service multi-user.target.wants/systemd-networkd.service \
    multi-user.target.wants/cairn-health-gate.service boot-complete.target.requires/cairn-health-gate.service \
    sysinit.target.wants/systemd-repart.service multi-user.target.wants/cairn-console-serial.service; do
    mkdir -p "$tree/etc/systemd/system/$(dirname "$link")"
    ln -sf "/usr/lib/systemd/system/$(basename "$link")" "$tree/etc/systemd/system/$link"
done
# The status screen owns tty1 (a login is on tty2, Alt-F2); the serial port gets it in plain text.
ln -sf /usr/lib/systemd/system/cairn-console@.service "$tree/etc/systemd/system/multi-user.target.wants/cairn-console@tty1.service"
ln -sf /dev/null "$tree/etc/systemd/system/getty@tty1.service"
echo cairn > "$tree/etc/hostname" # not the build host's name
mkdir -p "$tree/efi" # the ESP's mount point (fstab); the root is read-only at run time
cp "$tree/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$tree/boot/initrd.img-$kver" "$work/initrd"
rm -rf "$tree/boot/"*
find "$tree" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h -d "@$SOURCE_DATE_EPOCH"

# 3. The root filesystem and its verity tree. UUIDs and salt come from the version, so a rebuild is identical.
uuid_of() { printf '%s' "$1" | sha256sum | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12}).*/\1-\2-4\3-8\4-\5/'; }
root_uuid=$(uuid_of "cairn-root-$version")
mkfs.erofs -zlz4hc -T"$SOURCE_DATE_EPOCH" -U "$root_uuid" --quiet "$work/root.erofs" "$tree" >/dev/null
salt=$(printf '%s' "cairn-verity-$version" | sha256sum | cut -c1-64)
veritysetup format "$work/root.erofs" "$work/root.verity" --salt="$salt" \
    --uuid="$(uuid_of "cairn-verity-$version")" --root-hash-file="$work/roothash" >/dev/null
roothash=$(cat "$work/roothash")

# 4. The ESP: systemd-boot, slot A's kernel and initrd, its boot entry with three tries.
esp_mib=256 root_mib=1024 verity_mib=32 disk_mib=4096
mkfs.vfat -C -n CAIRN-ESP -i 0ca1e5e5 "$work/esp.img" $((esp_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
m() { mmd -i "$work/esp.img" "$@"; }
c() { mcopy -i "$work/esp.img" -m "$@"; }
m ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/cairn ::/loader ::/loader/entries "::/EFI/cairn/$version-a"
c "$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
c "$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" ::/EFI/systemd/systemd-bootx64.efi
c "$work/vmlinuz" "::/EFI/cairn/$version-a/vmlinuz"
c "$work/initrd" "::/EFI/cairn/$version-a/initrd"
printf 'timeout 0\nconsole-mode keep\neditor no\n' > "$work/loader.conf"
c "$work/loader.conf" ::/loader/loader.conf
"$here/entry.sh" "$version" a "$roothash" > "$work/entry.conf"
c "$work/entry.conf" "::/loader/entries/cairn-$version-a+3.conf"

# 5. The GPT. The data partition is not here: systemd-repart makes it at first boot (encrypted to the TPM),
# in the space after root-b-verity.
img="$out/cairn-$version.img"
rm -f "$img"
truncate -s "${disk_mib}M" "$img"
sfdisk --quiet "$img" <<EOF
label: gpt
label-id: $(uuid_of "cairn-disk")
first-lba: 2048
start=1MiB, size=${esp_mib}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$(uuid_of cairn-esp), name=esp
size=${root_mib}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$(uuid_of cairn-root-a), name=root-a
size=${verity_mib}MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, uuid=$(uuid_of cairn-root-a-verity), name=root-a-verity
size=${root_mib}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$(uuid_of cairn-root-b), name=root-b
size=${verity_mib}MiB, type=2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5, uuid=$(uuid_of cairn-root-b-verity), name=root-b-verity
EOF
put() { # put FILE PARTITION-NUMBER
    local start size
    start=$(sfdisk --json "$img" | jq ".partitiontable.partitions[$(($2 - 1))].start")
    size=$(sfdisk --json "$img" | jq ".partitiontable.partitions[$(($2 - 1))].size")
    [ "$(stat -c %s "$1")" -le $((size * 512)) ] || die "$(basename "$1") does not fit partition $2"
    dd if="$1" of="$img" bs=512 seek="$start" conv=notrunc,sparse status=none
}
put "$work/esp.img" 1
put "$work/root.erofs" 2
put "$work/root.verity" 3

cp "$work/root.erofs" "$out/cairn-$version.root.erofs"
cp "$work/root.verity" "$out/cairn-$version.root.verity"
cp "$work/vmlinuz" "$out/cairn-$version.vmlinuz"
cp "$work/initrd" "$out/cairn-$version.initrd"
echo "$roothash" > "$out/cairn-$version.roothash"
"$fleet_bin" reference --name "cairn $version" --loader "$tree/usr/lib/systemd/boot/efi/systemd-bootx64.efi" \
    --kernel "$work/vmlinuz" --out "$out/cairn-$version.reference-measurements.json" >/dev/null
sha() { sha256sum "$1" | cut -d' ' -f1; }
jq -n --arg version "$version" --arg roothash "$roothash" --arg kver "$kver" \
    --arg root_sha "$(sha "$work/root.erofs")" --argjson root_bytes "$(stat -c %s "$work/root.erofs")" \
    --arg verity_sha "$(sha "$work/root.verity")" --argjson verity_bytes "$(stat -c %s "$work/root.verity")" \
    --arg kernel_sha "$(sha "$work/vmlinuz")" --arg initrd_sha "$(sha "$work/initrd")" \
    --argjson esp_mib $esp_mib --argjson root_mib $root_mib --argjson verity_mib $verity_mib --argjson disk_mib $disk_mib \
    '{version: $version, kernel: $kver, roothash: $roothash,
      root: {bytes: $root_bytes, sha256: $root_sha}, verity: {bytes: $verity_bytes, sha256: $verity_sha},
      kernel_sha256: $kernel_sha, initrd_sha256: $initrd_sha,
      layout_mib: {esp: $esp_mib, root: $root_mib, verity: $verity_mib, disk: $disk_mib}}' > "$out/cairn-$version.json"
echo "image: $img (root $(du -h "$work/root.erofs" | cut -f1), roothash ${roothash:0:16}…)" >&2
