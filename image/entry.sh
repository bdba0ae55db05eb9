#!/usr/bin/env bash
# Prints the systemd-boot entry for one slot of one version: image/entry.sh VERSION SLOT ROOTHASH
# An update writes the entry for the other slot with this same layout;
# the qemu tier boots both slots. The last console= is /dev/console (systemd status, emergency shell): the
# serial port, which headless boxes and the qemu tier read; the screen on tty1 gets the kernel log.
# fbcon=font:TER16x32: the kernel's large font, so the status screen on tty1 reads from a metre away.
# Status lines name units (short lines the console does not cut, and the name is what `journalctl -u` wants).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 VERSION SLOT(a|b) ROOTHASH" >&2; exit 2; }
version=$1 slot=$2 roothash=$3
case $slot in a|b) ;; *) echo "$0: slot must be a or b, not $slot" >&2; exit 2 ;; esac
[[ $roothash =~ ^[0-9a-f]{64}$ ]] || { echo "$0: root hash must be 64 hex digits" >&2; exit 2; }
cat <<ENTRY
title cairn $version (slot $slot)
version $version
sort-key cairn
linux /EFI/cairn/$version-$slot/vmlinuz
initrd /EFI/cairn/$version-$slot/initrd
options roothash=$roothash systemd.verity_root_data=/dev/disk/by-partlabel/root-$slot systemd.verity_root_hash=/dev/disk/by-partlabel/root-$slot-verity root=/dev/mapper/root rootfstype=erofs ro console=tty1 console=ttyS0,115200 fbcon=font:TER16x32 systemd.status_unit_format=name cairn.slot=$slot
ENTRY
