#!/usr/bin/env bash
# What a one-package change costs a device: builds 1.0.0 and 1.0.1 (the same plus one Debian package, PKG,
# default `less`), publishes both into a scratch update repository and prints the bytes a device on 1.0.0
# fetches for 1.0.1 (the chunks it lacks) against the whole image. Appends a JSON line to
# target/bench/results.jsonl. Needs the release agent and the debug fleet built (`just bench-delta` does it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
pkg=${1:-less}
fleet="$repo/target/debug/cairn-fleet"
work="$repo/target/bench/delta"
rm -rf "$work"
mkdir -p "$work"
"$here/build.sh" --version 1.0.0 --out "$work/images"
"$here/build.sh" --version 1.0.1 --out "$work/images" --extra-packages "$pkg"
"$fleet" update keygen --dir "$work/keys" >/dev/null
publish() {
    "$fleet" update publish --repo "$work/repo" --key "$work/keys/update-signer.key" \
        --image "$work/images/cairn-$1.json"
}
full=$(publish 1.0.0)
delta=$(publish 1.0.1)
echo "$full"
echo "$delta"
# "…: 207 chunks, 207 new (157905794 bytes compressed); …"
bytes() { sed -nE 's/.* ([0-9]+) new \(([0-9]+) bytes compressed\).*/\2/p' <<<"$1"; }
chunks() { sed -nE 's/.*: ([0-9]+) chunks, ([0-9]+) new .*/\2 of \1/p' <<<"$1"; }
full_bytes=$(bytes "$full")
delta_bytes=$(bytes "$delta")
[ -n "$full_bytes" ] && [ -n "$delta_bytes" ] || { echo "delta-bench: cannot read the publish output" >&2; exit 1; }
# Which pieces changed, from the two manifests.
changed=$(jq -rn --slurpfile a "$work/images/cairn-1.0.0.json" --slurpfile b "$work/images/cairn-1.0.1.json" '
    [["root", $a[0].root.sha256, $b[0].root.sha256], ["verity", $a[0].verity.sha256, $b[0].verity.sha256],
     ["kernel", $a[0].kernel_sha256, $b[0].kernel_sha256], ["initrd", $a[0].initrd_sha256, $b[0].initrd_sha256]]
    | map(select(.[1] != .[2]) | .[0]) | join(",")')
pct=$(awk -v d="$delta_bytes" -v f="$full_bytes" 'BEGIN { printf "%.1f", 100 * d / f }')
printf '\none-package change (+%s): %s bytes to fetch (%s chunks) against %s for the whole image: %s%%; pieces changed: %s\n' \
    "$pkg" "$delta_bytes" "$(chunks "$delta")" "$full_bytes" "$pct" "${changed:-none}"
mkdir -p "$repo/target/bench"
jq -cn --arg pkg "$pkg" --argjson delta "$delta_bytes" --argjson full "$full_bytes" --arg changed "$changed" \
    --arg at "$(date -u +%FT%TZ)" \
    '{bench: "update_delta_one_package", package: $pkg, delta_bytes: $delta, full_bytes: $full, pieces_changed: $changed, at: $at}' \
    >> "$repo/target/bench/results.jsonl"
