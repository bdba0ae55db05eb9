#!/usr/bin/env bash
# The cairn demo: a whole simulated site, narrated. Stops everything it started on exit or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
dir=$(mktemp -d /tmp/cairn-demo.XXXXXX)

bold=$'\e[1m'; green=$'\e[32m'; red=$'\e[31m'; dim=$'\e[2m'; off=$'\e[0m'
[ -t 1 ] || { bold=; green=; red=; dim=; off=; }
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
say() { printf '   %s\n' "$*"; }
ok() { printf '   %s✔ %s%s\n' "$green" "$*" "$off"; }
fail() { printf '   %s✘ %s%s\n' "$red" "$*" "$off"; exit 1; }

cleanup() {
    step "Stopping the simulated site"
    "$bin/cairn-sim" down "$dir" 2>/dev/null || true
    left=$(pgrep -f "$dir" || true)
    if [ -z "$left" ]; then ok "nothing left running"; else printf '   still running: %s\n' "$left"; fi
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

status_json() { "$bin/cairnctl" --config "$dir/cairnd.toml" status --json; }
# wait_for SECONDS JQ-EXPRESSION: polls cairnctl status until the expression is true.
wait_for() {
    local deadline=$((SECONDS + $1))
    until status_json 2>/dev/null | jq -e "$2" >/dev/null; do
        [ $SECONDS -lt $deadline ] || fail "timed out waiting for: $2"
        sleep 0.3
    done
}

step "Bringing up a simulated site in $dir"
say "software TPM (swtpm, with an EK certificate) after a simulated measured boot (PCRs 0-7 and"
say "an event log), the reference fleet over HTTPS, a fake NVIDIA driver with 8× H100, a fake sysfs"
say "tree with 8 NVMe drives, a booted systemd container for the workloads (systemd-nspawn; the first"
say "run builds its Debian rootfs with mmdebstrap, under a minute), and cairnd. Nobody types anything on the device."
"$bin/cairn-sim" up "$dir" --trust operator --worn-drive 2 --failing-drive 5 --workloads >/dev/null
set -a; . "$dir/site.env"; set +a
ok "swtpm pid $SWTPM_PID at $TPM_TCTI"
ok "fleet pid $FLEET_PID at $FLEET_URL (its CA: $FLEET_STATE/ca.pem)"
ok "systemd for workloads: nspawn pid $NSPAWN_PID, its system bus handed to cairnd"
ok "cairnd pid $CAIRND_PID, config $CAIRN_CONFIG"

fleet() { "$bin/cairn-fleet" devices --state "$FLEET_STATE" "$@"; }

step "Onboarding, step 1: the device enrols its TPM; the fleet does not know it yet"
say "this fleet was given no manufacturer CA and no allow-list, so the TPM waits for a person"
wait_for 30 '.onboarding.state == "awaiting_approval"'
say "what the monitor on the box shows (cairn-console, here once and without colour; on the box it is"
say "live on tty1, in the kernel's large font, with a QR code of the id and code):"
"$bin/cairn-console" --once --plain | sed -n '1,/^ device id/p' | sed 's/^/   /'
say "the fleet's view (cairn-fleet devices --state $FLEET_STATE):"
fleet | sed 's/^/   /'
code=$({ "$bin/cairnctl" overview --json || true; } | jq -r .code)

step "Onboarding, step 2: the tech reads code $code off the screen; an operator approves it"
fleet approve "$code" | sed 's/^/   /'

step "Onboarding, step 3: credential activation, quote, certified keys, certificate (cairnctl attest)"
say "the fleet seals a secret to the EK for the AK's name (MakeCredential); only this TPM can open it;"
say "the quote over the fleet's nonce and the event log replay to the same PCRs; the AK certifies the"
say "TPM-resident device and telemetry keys; the fleet issues the device certificate"
"$bin/cairnctl" attest | sed 's/^/   /' || fail "onboarding failed"
fleet | sed 's/^/   /'
ok "onboarded; from now on the device talks mTLS with a key that never leaves its TPM"

step "What cairnd sees (cairnctl status)"
"$bin/cairnctl" status | sed 's/^/   /'

step "The TPM stays free for operators while cairnd runs"
TPM2TOOLS_TCTI="$TPM_TCTI" tpm2_getcap properties-fixed | grep -A1 TPM2_PT_MANUFACTURER | sed 's/^/   /'

step "An operator checks a TPM quote independently (tpm2_checkquote)"
nonce=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
"$bin/cairnctl" quote --nonce "$nonce" --pcrs sha256:0,1,2,3,4,5,6,7 --out "$dir/quote" | sed 's/^/   /'
if (cd "$dir/quote" && tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q "$nonce" >/dev/null); then
    ok "quote over PCRs 0-7 with nonce $nonce verifies with the device's attestation key"
else
    fail "tpm2_checkquote refused the quote"
fi
if (cd "$dir/quote" && tpm2_checkquote -u ak.pub -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q 00 >/dev/null 2>&1); then
    fail "a wrong nonce was accepted"
else
    ok "the same quote with another nonce is refused"
fi

step "Prometheus metrics at $METRICS_URL (dcgm-exporter names)"
curl -fsS "$METRICS_URL" | grep -E '^(cairn_component_up|DCGM_FI_DEV_GPU_TEMP\{gpu="0"|smartctl_device_percentage_used\{device="nvme2"|node_rapl_package_joules_total)' | sed 's/^/   /'

step "Health: every component judged (cairnctl health)"
say "the simulated tree has a worn drive (nvme2) and a failing one (nvme5); thresholds are in [health]"
"$bin/cairnctl" health | sed 's/^/   /' || true

step "Fault: GPU 3 reports XID 79 (fallen off the bus)"
printf 'profile = "h100x8"\n[gpu.3]\nxid = [79]\n' > "$FAKE_NVML_CONFIG.tmp" && mv "$FAKE_NVML_CONFIG.tmp" "$FAKE_NVML_CONFIG"
wait_for 15 '[.health[] | select(.component == "gpu 3" and .state == "failed")] | length == 1'
{ "$bin/cairnctl" health --json || true; } | jq -r '.events[] | select(.component == "gpu 3") | "   \(.kind) \(.severity): \(.message)"'
ok "an event, and GPU 3 failed within one poll; the other GPUs stay ok"

step "Fault: GPU 5 falls off the bus"
say "writing 'lost = true' for GPU 5 into the fake driver's file $FAKE_NVML_CONFIG"
printf 'profile = "h100x8"\n[gpu.3]\nxid = [79]\n[gpu.5]\nlost = true\n' > "$FAKE_NVML_CONFIG.tmp" && mv "$FAKE_NVML_CONFIG.tmp" "$FAKE_NVML_CONFIG"
wait_for 15 '.gpus.facts.gpus[5].problem != null'
"$bin/cairnctl" status | grep -A1 '^gpus' | sed 's/^/   /'
say "the status screen: each red line with its cause and the next step (cairnctl overview):"
{ "$bin/cairnctl" overview || true; } | grep -A3 -E '^ (FAIL|WAIT)  (GPUs|SSDs)' | sed 's/^/   /'
ok "cairnd names the lost GPU and keeps running"

step "Uplink outage: the fleet goes away"
"$bin/cairn-sim" fleet-stop "$dir"
wait_for 15 '.fleet.state == "unavailable"'
"$bin/cairnctl" status | grep '^fleet' | sed 's/^/   /'
sleep 3
say "meanwhile every sample and event goes into the spool on the data partition (cairnctl telemetry):"
"$bin/cairnctl" telemetry | sed 's/^/   /'
say "on the status screen:"
{ "$bin/cairnctl" overview || true; } | grep -A3 -E '^ ( OK |FAIL|WAIT)  (Uplink|Telemetry)' | sed 's/^/   /'

step "Uplink back"
"$bin/cairn-sim" fleet-start "$dir"
wait_for 15 '.fleet.state == "ok"'
"$bin/cairnctl" status | grep '^fleet' | sed 's/^/   /'
ok "fleet reachable again"
target=$("$bin/cairnctl" telemetry --json | jq .durable_seq)
deadline=$((SECONDS + 60))
until [ "$("$bin/cairnctl" telemetry --json | jq .acked_seq)" -ge "$target" ]; do
    [ $SECONDS -lt $deadline ] || fail "the telemetry backlog did not drain"
    sleep 0.5
done
"$bin/cairnctl" telemetry | sed 's/^/   /'
say "the fleet's view: every sequence once, signed by the TPM's telemetry key (cairn-fleet telemetry):"
"$bin/cairn-fleet" telemetry --state "$FLEET_STATE" | sed 's/^/   /'
ok "the backlog arrived, checked against the key the AK certified at onboarding"

workloads_json() { "$bin/cairnctl" workloads --json 2>/dev/null || true; }
# wait_workloads SECONDS JQ-EXPRESSION: polls cairnctl workloads until the expression is true.
wait_workloads() {
    local deadline=$((SECONDS + $1))
    until workloads_json | jq -e "$2" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || { "$bin/cairnctl" workloads | sed 's/^/   /'; fail "timed out waiting for: $2"; }
        sleep 0.5
    done
}
sign() { "$bin/cairn-fleet" workloads sign --key "$WORKLOAD_SIGNER" "$@" | sed 's/^/   /'; }
sets="$FLEET_STATE/workloads"
mkdir -p "$sets" "$dir/recipes"

step "Workloads: the fleet signs what the site runs"
say "two of the example recipes: camera-analytics (one GPU, HTTP health check, watchdog, needs a trusted"
say "site) and nightly-report (a batch job after it). The fleet signs them as set 1 (COSE, ES256); the"
say "device holds only the public key and fetches the set over mTLS"
sign --serial 1 --out "$sets/default.cose" recipes/camera-analytics.toml recipes/nightly-report.toml
wait_workloads 60 '[.workloads[] | select((.name == "camera-analytics" and .state == "running" and .health == "ok") or (.name == "nightly-report" and .state == "completed"))] | length == 2'
"$bin/cairnctl" workloads | sed 's/^/   /'
say "the service answers on the site: $(curl -fsS http://127.0.0.1:8080/counts)"
bus=$(sed -n 's/^dbus_address = "\(.*\)"$/\1/p' "$CAIRN_CONFIG")
say "its sandbox, as systemd holds it (busctl on the container's bus):"
for prop in DynamicUser ProtectSystem MemoryMax CPUQuotaPerSecUSec DevicePolicy DeviceAllow; do
    printf '   %-20s %s\n' "$prop" "$(DBUS_SYSTEM_BUS_ADDRESS=$bus busctl --system get-property org.freedesktop.systemd1 \
        /org/freedesktop/systemd1/unit/cairn_2dwl_2dcamera_2danalytics_2eservice org.freedesktop.systemd1.Service "$prop")"
done
ok "converged: each workload a transient unit in cairn-workloads.slice, GPU 0 its only /dev/nvidia device"

step "Workloads: a tampered set and a replayed one are refused"
cp "$sets/default.cose" "$dir/set-1.cose"
LC_ALL=C sed 's/8080/8081/' "$dir/set-1.cose" > "$sets/default.cose"
wait_workloads 15 '.refused != null and (.refused | test("signature"))'
"$bin/cairnctl" workloads | sed -n 's/^last set refused/   last set refused/p'
cp recipes/camera-analytics.py recipes/nightly-report.sh "$dir/recipes/"
sed 's/^version = "1.2.0"/version = "1.3.0"/' recipes/camera-analytics.toml > "$dir/recipes/camera-analytics.toml"
sign --serial 2 --out "$sets/default.cose" "$dir/recipes/camera-analytics.toml" recipes/nightly-report.toml
wait_workloads 60 '.serial == 2 and ([.workloads[] | select(.name == "camera-analytics" and .running_version == "1.3.0" and .state == "running")] | length == 1)'
ok "set 2 replaced camera-analytics 1.2.0 with 1.3.0 (same port: stopped first, then started)"
cp "$dir/set-1.cose" "$sets/default.cose"
wait_workloads 15 '.refused != null and (.refused | test("not above"))'
"$bin/cairnctl" workloads | sed -n 's/^last set refused/   last set refused/p'
ok "the old, validly signed set 1 is refused as a replay; set 2 keeps running"

step "Tampering: something measures itself into PCR 4 that the boot log does not show"
tpm2_pcrextend -T "$TPM_TCTI" "4:sha256=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
if "$bin/cairnctl" attest | sed 's/^/   /'; then fail "the fleet trusted a tampered device"; fi
fleet | sed 's/^/   /'
ok "refused, with the reason on both sides; the fleet no longer honours the device's certificate"

step "The local status page (read-only) at $PAGE_URL"
say "on a box it answers only on the management port (page.interfaces); here on loopback:"
curl -fsS "$PAGE_URL" | grep -o '<div id="verdict"[^<]*</div>' | sed 's/<[^>]*>//g; s/^/   verdict: /'
say "anything but GET and HEAD: HTTP $(curl -s -o /dev/null -w '%{http_code}' -X POST "$PAGE_URL") (nothing on the page changes the box)"

step "Diagnostics for ops (cairnctl diagnose)"
"$bin/cairnctl" diagnose --json --out "$dir" | jq -r '"   wrote \(.archive)", "   files: \(.files | join(", "))"'
ok "versions, redacted configuration, the agent's view, journal, data directory names; no key material"

step "Not in this demo"
say "the A/B image, OTA updates and the status screen on a real console run under qemu: \`just test-qemu\`"
say "(docs/image.md); runbooks for the people at the site are in docs/runbooks/."
