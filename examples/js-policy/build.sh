#!/usr/bin/env bash
# Build policy.wasm, a gpulet power-policy component, from component.js + policy.js.
#
#   ./build.sh                  # writes ./policy.wasm
#   OUT=/some/dir ./build.sh    # writes /some/dir/policy.wasm
#
# Works from any directory. Needs Node.js >= 20 and npm; installs the pinned tools
# (package-lock.json) into node_modules/ beside this script on first use.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

# The contract, used in place (not copied): the build fails if the WIT and the policy
# disagree. Override with WIT=DIR for a copy of gpulet's wit/v0.1.2 elsewhere.
wit="${WIT:-$here/../../wit/v0.1.2}"
[ -f "$wit/policy.wit" ] || { echo "build.sh: no policy.wit in $wit (set WIT=...)" >&2; exit 1; }
wit="$(cd "$wit" && pwd)"

cd "$here"

# Exactly the versions in package-lock.json; again only when the lock changed since.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi

# componentize-js directly, not `jco componentize`: jco 1.35.0 reads the WIT through its
# own Wasm build of wasm-tools on @bytecodealliance/preview2-shim 0.26, which no longer
# preopens "/", so it fails with "failed to get path metadata: No such file or directory
# (os error 44)". componentize-js resolves the shim 0.25.0 that package.json pins (it
# preopens "/"), and reads the WIT fine.
#
#   --wit / --world-name power   gpulet's contract, the power-policy world.
#   --disable (all five)         Leave out every optional feature of the JS engine
#                                (StarlingMonkey), so that the component imports only
#                                gpulet:policy/{host,types} and no WASI at all:
#     http, fetch-event  fetch() and the incoming-request handler import wasi:http, which
#                        gpulet refuses at load ("imports wasi:http/types@0.2.10, which
#                        gpulet does not grant to plugins"). Required.
#     clocks             Date.now()/performance.now(): a policy uses the snapshot's now-ms,
#                        which keeps it replayable (`gpulet plugin replay`).
#     random             Math.random()/crypto: with it off they still work but are
#                        deterministic, which again keeps a replay exact.
#     stdio              console.* and the engine's error reports: gpulet sends a plugin's
#                        stdout and stderr nowhere, so they would only add imports
#                        (wasi:cli, io, clocks, filesystem). component.js logs an uncaught
#                        exception through the host's `log` instead.
#   No --aot: ahead-of-time JS compilation (weval) is not needed for ~2 ms a tick.
node node_modules/@bytecodealliance/componentize-js/src/cli.js component.js \
  --wit "$wit" --world-name power \
  --disable http fetch-event clocks random stdio \
  -o "$out/policy.wasm"

echo "built $out/policy.wasm ($(wc -c < "$out/policy.wasm") bytes)"
