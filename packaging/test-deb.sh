#!/usr/bin/env bash
# The .deb, tested as dpkg really installs it: built by cargo-deb from what `cargo test`
# built (the test profile: one build per run), then installed, upgraded and purged by
# dpkg itself in a scratch root (`dpkg --root` with `--force-script-chrootless`: the
# maintainer scripts run with DPKG_ROOT set, as Debian's chrootless bootstrap runs
# them), and checked by lintian. `.ci/test` runs it after the test suite.
#
#   packaging/test-deb.sh          # needs cargo-deb, dpkg, lintian (.ci/test installs them)
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cargo-deb dpkg lintian groupadd; do
    command -v "$tool" >/dev/null || { echo "test-deb: $tool is missing (.ci/test installs it)" >&2; exit 1; }
done
[ -x target/debug/gpulet ] || { echo "test-deb: build first (cargo test, or cargo build)" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
fail() { echo "test-deb: FAILED: $*" >&2; exit 1; }
pass() { echo "test-deb: ok: $*"; }

# Two versions of the same package: the upgrade's is the next revision.
deb() { cargo deb -p gpulet --no-build --profile dev --deb-revision "$1" -o "$out/gpulet-$1.deb" 2>"$out/cargo-deb.log" \
    || { cat "$out/cargo-deb.log" >&2; fail "cargo deb"; }; }
deb 1
deb 2
v1="$out/gpulet-1.deb" v2="$out/gpulet-2.deb"

# lintian: clean but for the overrides the package ships, each justified there.
lintian --tag-display-limit 0 --fail-on warning "$v1" 2>&1 | grep -v 'running with root privileges' \
    || true
lintian --tag-display-limit 0 --fail-on warning "$v1" >/dev/null 2>&1 || fail "lintian has warnings or errors"
pass "lintian clean (overrides: $(grep -c '^gpulet:' packaging/debian/lintian-overrides), justified in packaging/debian/lintian-overrides)"

# A scratch root with an empty dpkg database and the files groupadd --prefix edits.
root="$out/root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
touch "$root/var/lib/dpkg/status" "$root/var/lib/dpkg/available"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'root:*::\n' >"$root/etc/gshadow"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
# (The scratch root has no libc6 or passwd package: --force-depends.)
dpkg_root() { dpkg --root="$root" --force-script-chrootless --force-depends --force-not-root "$@" >"$out/dpkg.log" 2>&1 \
    || { cat "$out/dpkg.log" >&2; fail "dpkg $*"; }; }

# Install.
dpkg_root --install "$v1"
dpkg --root="$root" -s gpulet | grep -q '^Status: install ok installed' || fail "not installed"
for f in usr/bin/gpulet usr/lib/systemd/system/gpulet.service etc/gpulet/gpulet.toml \
    usr/lib/gpulet/plugins/power-budget.wasm usr/lib/gpulet/plugins/thermal-guard.wasm \
    usr/lib/gpulet/plugins/idle-saver.wasm usr/lib/gpulet/plugins/fifo-binpack.wasm \
    usr/lib/gpulet/plugins/priority-backfill.wasm usr/lib/gpulet/plugins/anomaly.wasm \
    usr/share/doc/gpulet/copyright \
    usr/share/doc/gpulet/examples/gpulet.toml; do
    [ -e "$root/$f" ] || fail "$f is not installed"
done
grep -q '^gpulet:x:[0-9]*:' "$root/etc/group" || fail "the gpulet group was not made"
grep -qx '/etc/gpulet/gpulet.toml' "$root/var/lib/dpkg/info/gpulet.conffiles" || fail "the config is not a conffile"
"$root/usr/bin/gpulet" --version >/dev/null || fail "the installed binary does not run"
"$root/usr/bin/gpulet" check-config "$root/etc/gpulet/gpulet.toml" >/dev/null || fail "the installed config is not valid"
# The shipped plugins load (checked by the installed binary against the installed files).
for p in power-budget thermal-guard idle-saver fifo-binpack priority-backfill; do
    "$root/usr/bin/gpulet" plugin check "$root/usr/lib/gpulet/plugins/$p.wasm" >/dev/null 2>&1 \
        || fail "the shipped plugin $p does not load"
done
pass "installed: binary, unit, conffile, plugins, docs, the gpulet group; config and plugins check"

# The operator edits the config; the agent keeps state.
printf '\n# edited by the operator\n' >>"$root/etc/gpulet/gpulet.toml"
edited=$(sha256sum <"$root/etc/gpulet/gpulet.toml")
mkdir -p "$root/var/lib/gpulet/nvml" "$root/var/cache/gpulet/plugins"
echo '{"kept": true}' >"$root/var/lib/gpulet/calibration.json"

# Upgrade: the edited conffile and the state are kept.
dpkg_root --install "$v2"
dpkg --root="$root" -s gpulet | grep -q '^Version: 0.1.0-2' || fail "not upgraded"
[ "$(sha256sum <"$root/etc/gpulet/gpulet.toml")" = "$edited" ] || fail "the edited conffile was not kept"
[ -f "$root/var/lib/gpulet/calibration.json" ] || fail "the state directory was not kept"
[ "$(grep -c '^gpulet:' "$root/etc/group")" = 1 ] || fail "the group was made twice"
pass "upgraded: the edited conffile and /var/lib/gpulet kept"

# The upgrade's restart, on a running system with systemd: postinst run as dpkg runs it
# there (no DPKG_ROOT), with stand-ins for systemctl and deb-systemd-invoke that record
# their calls, and the check for systemd pointed at a folder of this test.
fake="$out/fake"
mkdir -p "$fake/bin" "$fake/systemd"
for tool in systemctl deb-systemd-invoke deb-systemd-helper getent groupadd; do
    printf '#!/bin/sh\necho "%s $*" >>"%s/calls"\n[ "$*" != "is-active --quiet gpulet.service" ] || [ -e "%s/active" ]\n' \
        "$tool" "$fake" "$fake/systemd" >"$fake/bin/$tool"
    chmod +x "$fake/bin/$tool"
done
# (getent and groupadd are stand-ins too: nothing of the build machine's is changed.)
postinst() { env -u DPKG_ROOT PATH="$fake/bin:$PATH" GPULET_SYSTEMD_DIR="$fake/systemd" \
    sh "$root/var/lib/dpkg/info/gpulet.postinst" configure "$@"; }
touch "$fake/systemd/active"
postinst 0.1.0-1
grep -qx 'deb-systemd-invoke restart gpulet.service' "$fake/calls" || fail "a running agent was not restarted by the upgrade: $(cat "$fake/calls")"
: >"$fake/calls"
rm "$fake/systemd/active"
postinst 0.1.0-1
! grep -q 'restart' "$fake/calls" || fail "a stopped agent was started by the upgrade"
: >"$fake/calls"
postinst ""
! grep -qE 'restart|start|enable' "$fake/calls" || fail "a first install started or enabled the agent: $(cat "$fake/calls")"
grep -qx 'deb-systemd-helper update-state gpulet.service' "$fake/calls" || fail "the enablement state is not recorded (purge could not clean it)"
pass "upgrade restarts a running agent; a first install neither enables nor starts it"

# Remove, then purge: the state, the cache and /etc/gpulet go; the group stays.
dpkg_root --remove gpulet
[ ! -e "$root/usr/bin/gpulet" ] || fail "remove left the binary"
[ -f "$root/etc/gpulet/gpulet.toml" ] || fail "remove took the conffile (only purge may)"
echo 'operator key' >"$root/etc/gpulet/ops.pub"
dpkg_root --purge gpulet
for d in var/lib/gpulet var/cache/gpulet etc/gpulet/gpulet.toml; do
    [ ! -e "$root/$d" ] || fail "purge left /$d"
done
[ -f "$root/etc/gpulet/ops.pub" ] || fail "purge removed a file of the operator's"
! dpkg --root="$root" -s gpulet >/dev/null 2>&1 || fail "still known to dpkg after purge"
pass "removed (conffile kept), then purged (conffile, state and cache gone; the operator's own file in /etc/gpulet kept)"
echo "test-deb: all passed"
