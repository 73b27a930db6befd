#!/usr/bin/env bash
# Bridged sites (docs/fleet.md, BENCHMARKS.md): three local Mosquittos, a central one and
# two site brokers (site-a, site-b), each site bridged to the centre over MQTT 5 (QoS 1,
# persistent bridge session, persistence on). NODES `gpulet run` nodes per site (8
# simulated GPUs, 1 s tick, outbox synced every tick) publish to their site broker; at the
# centre two consumers read with one shared subscription (or one plain one). Then:
#   1. the central broker is killed (-9) for OUTAGE s and restarted (same port, same
#      persistence);
#   2. site-a's broker is killed (-9) for OUTAGE s and restarted, the centre up;
#   3. the centre is killed again for OUTAGE s; halfway, while site-b's bridge holds a
#      queue for it, site-b's broker is killed (-9) and restarted 5 s later.
# At the end the nodes stop cleanly, and what arrived at the centre is counted per node
# against what each node wrote (its outbox's next seq, read from its state after the
# stop): received, distinct (node, inc, seq), duplicates, missing seq ranges and when
# they were written, and the data-loss events. About 2 minutes.
#
# Verdict (docs/fleet.md, "What is guaranteed"): a record missing at the centre that no
# data-loss event names has been acknowledged by a broker and lost there. It is explained
# only by a Mosquitto limit that docs/fleet.md names, checked against the brokers' logs:
#   - a broker killed with -9 loses what it acknowledged after its last database save:
#     the record was written between that save and the kill, by a node of that site (or
#     of any site, for the centre);
#   - a queue past max_queued_messages / max_queued_bytes drops new messages (the broker
#     logs "Outgoing messages are being dropped for client ...");
#   - after a restart of the centre, a shared subscription of an offline session is not
#     restored (Mosquitto 2.0.11): what a bridge forwards before a consumer of the group
#     has subscribed again is dropped (the centre's log shows the bridge back first).
# PASS: nothing missing. LOSS AS DOCUMENTED: every missing record is explained (exit 0).
# FAIL: a record is missing without such an explanation (exit 1).
#
# Usage: agent/benches/bridge.sh
# Environment:
#   NODES=3             nodes per site
#   OUTAGE=20           seconds each broker stays down (at least 10)
#   SITE_AUTOSAVE=each  when the site brokers save their database: `each` (after every
#                       change: autosave_on_changes true, autosave_interval 1) or a number
#                       of seconds (autosave_on_changes false, autosave_interval N; Mosquitto's
#                       default is 1800)
#   CENTRE_AUTOSAVE=10  the same for the central broker
#   QUEUE=100000        max_queued_messages on every broker (per client; a bridge is one)
#   QUEUE_BYTES=0       max_queued_bytes on every broker (0: no limit)
#   INGEST=shared       `shared`: two consumers, $share/ingest/...; `plain`: one consumer,
#                       plain subscriptions (restored from the centre's database at a restart)
#   GPULET=path         the binary to run (default: cargo build --release, target/release)
#   KEEP=1              keep the work folder (configs, logs, what arrived) and print its path
set -euo pipefail
cd "$(dirname "$0")/../.."
nodes=${NODES:-3}
outage=${OUTAGE:-20}
site_autosave=${SITE_AUTOSAVE:-each}
centre_autosave=${CENTRE_AUTOSAVE:-10}
queue=${QUEUE:-100000}
queue_bytes=${QUEUE_BYTES:-0}
ingest=${INGEST:-shared}
[ "$ingest" = shared ] || [ "$ingest" = plain ] || { echo "bridge.sh: INGEST is shared or plain" >&2; exit 2; }
[ "$outage" -ge 10 ] || { echo "bridge.sh: OUTAGE must be at least 10 s" >&2; exit 2; }
PATH="$PATH:/usr/sbin"
for tool in mosquitto mosquitto_sub python3; do
    command -v "$tool" > /dev/null || {
        echo "bridge.sh: $tool is missing (apt-get install mosquitto mosquitto-clients python3)" >&2
        exit 2
    }
done
if [ -n "${GPULET:-}" ]; then
    gpulet=$(realpath "$GPULET")
else
    cargo build --release --locked -p gpulet >&2
    gpulet=$PWD/target/release/gpulet
fi

dir=$(mktemp -d)
chmod 755 "$dir"
declare -A pid=()   # broker -> pid of its current instance
node_pids=()
sub_pids=()
cleanup() {
    local p
    for p in "${node_pids[@]}" "${sub_pids[@]}" "${pid[@]}"; do
        kill "$p" 2> /dev/null || true
    done
    wait 2> /dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept: $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port=([central]=$(free_port) [site-a]=$(free_port) [site-b]=$(free_port))
mark() { echo "$(date +%s%3N) $*" >> "$dir/timeline"; echo "[$(date +%T)] $*" >&2; }
saving() {
    if [ "$1" = each ]; then
        printf 'autosave_on_changes true\nautosave_interval 1\n'
    else
        printf 'autosave_on_changes false\nautosave_interval %s\n' "$1"
    fi
}
# Every broker: loopback and anonymous here (a real one has TLS and the ACLs of
# docs/mqtt.md), persistence on, the per-client queue limits given explicitly.
common() {
    # Mosquitto started as root drops to the user `mosquitto`, which must write here.
    mkdir -p "$dir/$1"
    chmod 777 "$dir/$1"
    printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "${port[$1]}"
    printf 'persistence true\npersistence_location %s/\n' "$dir/$1"
    printf 'max_queued_messages %s\nmax_queued_bytes %s\nmax_inflight_messages 20\n' "$queue" "$queue_bytes"
}
{
    common central
    saving "$centre_autosave"
} > "$dir/central.conf"
for site in site-a site-b; do
    {
        common "$site"
        saving "$site_autosave"
        cat <<EOF
connection $site
address 127.0.0.1:${port[central]}
bridge_protocol_version mqttv50
remote_clientid bridge-$site
cleansession false
local_cleansession false
restart_timeout 1 5
keepalive_interval 10
topic gpulet/v1/# out 1
EOF
    } > "$dir/$site.conf"
done

start_broker() {
    mosquitto -c "$dir/$1.conf" >> "$dir/$1.log" 2>&1 &
    pid[$1]=$!
    for _ in $(seq 50); do   # up when the port answers
        python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),0.2)' \
            "${port[$1]}" 2> /dev/null && return 0
        sleep 0.1
    done
    echo "bridge.sh: the $1 broker did not start:" >&2
    cat "$dir/$1.log" >&2
    exit 2
}
kill9_broker() {
    kill -9 "${pid[$1]}"
    wait "${pid[$1]}" 2> /dev/null || true
    mark "$1-killed"
}

start_broker central
start_broker site-a
start_broker site-b

# The ingest tier, on persistent sessions (clean start false, session expiry 1 h) so that
# the centre queues for it while it is away; telemetry and events (`seq` numbers both, so
# both are needed to see every seq). INGEST=shared: two consumers in one share group;
# INGEST=plain: one consumer with plain subscriptions.
if [ "$ingest" = shared ]; then
    filters=(-t '$share/ingest/gpulet/v1/+/telemetry' -t '$share/ingest/gpulet/v1/+/events/#')
    consumers=2
else
    filters=(-t 'gpulet/v1/+/telemetry' -t 'gpulet/v1/+/events/#')
    consumers=1
fi
for k in $(seq "$consumers"); do
    mosquitto_sub -h 127.0.0.1 -p "${port[central]}" -V mqttv5 -i "ingest-$k" -c -x 3600 -q 1 \
        -F '%U %t %p' "${filters[@]}" > "$dir/ingest-$k.out" 2> "$dir/ingest-$k.err" &
    sub_pids+=($!)
done
sleep 1

for site in site-a site-b; do
    for i in $(seq "$nodes"); do
        id=$(printf '%s-%02d' "${site#site-}" "$i")
        cat > "$dir/$id.toml" <<EOF
node = "$id"
tick = "1s"
backend = "sim"
[socket]
enabled = false
[telemetry]
sink = "none"
[sim]
seed = $i
[[sim.gpu]]
preset = "h100-sxm"
workload = "training"
count = 8
[mqtt]
url = "mqtt://127.0.0.1:${port[$site]}"
state_dir = "$dir/$id"
reconnect_max = "5s"
EOF
        echo "$id $site" >> "$dir/nodes"
        "$gpulet" run --config "$dir/$id.toml" > /dev/null 2> "$dir/$id.log" &
        node_pids+=($!)
    done
done
mark start
# Past the centre's first timed save, so that the consumers' sessions are on its disk.
sleep 15

kill9_broker central
sleep "$outage"
start_broker central
mark central-up
sleep 15

kill9_broker site-a
sleep "$outage"
start_broker site-a
mark site-a-up
sleep 15

kill9_broker central
sleep $((outage / 2))
kill9_broker site-b
sleep 5
start_broker site-b
mark site-b-up
sleep $((outage - outage / 2 - 5))
start_broker central
mark central-up
sleep 15

# Stop the nodes cleanly (each drains its outbox for up to 2 s, publishes `offline` and
# saves its outbox state), then wait until nothing more arrives at the centre.
mark stop
for p in "${node_pids[@]}"; do kill -TERM "$p" 2> /dev/null || true; done
for p in "${node_pids[@]}"; do wait "$p" 2> /dev/null || true; done
node_pids=()
last=-1
for _ in $(seq 30); do
    n=$(cat "$dir"/ingest-*.out | wc -l)
    [ "$n" = "$last" ] && break
    last=$n
    sleep 2
done
for p in "${sub_pids[@]}"; do kill -TERM "$p" 2> /dev/null || true; done
for p in "${sub_pids[@]}"; do wait "$p" 2> /dev/null || true; done
sub_pids=()
mark end
for b in central site-a site-b; do
    echo "$b $(stat -c %s "$dir/$b/mosquitto.db" 2> /dev/null || echo 0)" >> "$dir/db-sizes"
done

python3 - "$dir" "$site_autosave" "$centre_autosave" "$queue" "$queue_bytes" "$ingest" <<'PY'
import glob, json, os, re, sys
d, site_autosave, centre_autosave, queue, queue_bytes, ingest = sys.argv[1:7]
brokers = ("central", "site-a", "site-b")

def read_slot(path):
    try:
        js, _crc = open(path).read().strip().rsplit("\n", 1)
        return json.loads(js)
    except (OSError, ValueError):
        return None

node_site = dict(l.split() for l in open(f"{d}/nodes"))
timeline = [(int(t) / 1000, name) for t, name in (l.split() for l in open(f"{d}/timeline"))]
t_start = next(t for t, n in timeline if n == "start")
t_stop = next(t for t, n in timeline if n == "stop")
t_end = next(t for t, n in timeline if n == "end")
kills = [(t, n[: -len("-killed")]) for t, n in timeline if n.endswith("-killed")]
ups = [(t, n[: -len("-up")]) for t, n in timeline if n.endswith("-up")]
rel = lambda t: t - t_start

# Each broker's log: when it saved its database, and which queues it said it dropped from.
saves, drops = {}, {}
starts = []   # the centre's instances: (start time, [(time, client id) in connection order])
for b in brokers:
    saves[b], drops[b] = [], {}
    for l in open(f"{d}/{b}.log", errors="replace"):
        m = re.match(r"(\d+): (.*)", l.strip())
        if not m:
            continue
        t, text = int(m.group(1)), m.group(2)
        if text.startswith("Saving in-memory database"):
            saves[b].append(t)
        elif "being dropped for client" in text:
            c = text.rsplit(" ", 1)[1].rstrip(".")
            drops[b].setdefault(c, []).append(t)
        elif b == "central" and text.startswith("mosquitto version") and text.endswith("starting"):
            starts.append((t, []))
        elif b == "central" and text.startswith("New client connected") and starts:
            starts[-1][1].append((t, text.split(" as ")[1].split(" ")[0]))

# What each node wrote (its outbox's next seq) and still held at the stop.
produced, pending = {}, {}
for node in node_site:
    slots = [s for s in (read_slot(f"{d}/{node}/outbox/state.{x}") for x in "ab") if s]
    s = max(slots, key=lambda s: s["generation"])
    produced[node] = s["next_seq"]
    done = set(range(s["low"]))
    for a, b in s["done"]:
        done.update(range(a, b + 1))
    pending[node] = set(range(s["next_seq"])) - done

# What arrived at the centre, de-duplicated on (node, inc, seq).
got = {n: {} for n in node_site}   # node -> seq -> (ts_ms / 1000, arrival)
received = {n: 0 for n in node_site}
dup = {n: 0 for n in node_site}
historical = {n: 0 for n in node_site}
losses = {n: [] for n in node_site}   # data-loss events: (first_seq, last_seq)
per_consumer, seen = {}, set()
for f in sorted(glob.glob(f"{d}/ingest-*.out")):
    c = os.path.basename(f).split(".")[0]
    per_consumer[c] = 0
    for line in open(f, errors="replace"):
        try:
            at, topic, payload = line.rstrip("\n").split(" ", 2)
            m = json.loads(payload)
        except ValueError:
            continue
        per_consumer[c] += 1
        node = topic.split("/")[2]
        if node not in got:
            continue
        received[node] += 1
        if (node, m["inc"], m["seq"]) in seen:
            dup[node] += 1
            continue
        seen.add((node, m["inc"], m["seq"]))
        got[node][m["seq"]] = (m["ts_ms"] / 1000, float(at))
        historical[node] += bool(m.get("historical"))
        if topic.endswith("/events/data-loss"):
            losses[node].append((m["first_seq"], m["last_seq"]))

def ranges(seqs):
    out = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out

def explain(node, t0, t1):
    """Why records written between t0 and t1 (the times of the records either side of
    the gap) may be missing, by what Mosquitto documents; None if nothing explains it.
    Slack: ticks are 1 s apart, and Mosquitto logs whole seconds."""
    site = node_site[node]
    for k, b in kills:
        if b not in (site, "central"):
            continue
        last = max((s for s in saves[b] if s <= k), default=None)
        since = last - 1 if last is not None else t_start - 1
        if t0 >= since - 1 and t1 <= k + 2:
            saved = f"its last save {k - last:.0f} s before" if last is not None else "no save before"
            return f"{b} killed at +{rel(k):.0f} s, {saved}: acknowledged, not yet saved"
    # The centre restarted: Mosquitto (2.0.11) does not restore a shared subscription of
    # an offline session from its database; until a consumer of the group has
    # subscribed again, what a bridge forwards is acknowledged and dropped. Its log gives
    # the order in which the bridge and the consumers came back.
    for k, b in kills:
        if b != "central" or ingest != "shared":
            continue
        inst = next((c for t, c in starts if t >= k - 1), None)
        if not inst:
            continue
        bridge = next((i for i, (_, c) in enumerate(inst) if c == f"bridge-{site}"), None)
        first = next((i for i, (_, c) in enumerate(inst) if c.startswith("ingest-")), None)
        if bridge is not None and (first is None or bridge < first):
            until = inst[first][0] if first is not None else t_stop
            if t0 >= k - 3 and t1 <= until + 2:
                return (f"the centre restarted (+{rel(k):.0f} s) and bridge-{site} reconnected before "
                        f"any consumer had subscribed again: no shared subscription to deliver to")
    # A full queue: Mosquitto logs the first drop of an episode, which lasts until the
    # queue drains (here: the centre back, plus 10 s).
    for b, bridge in ((site, f"local.bridge-{site}"), ("central", None)):
        for c, ts in drops[b].items():
            if not ((bridge is None and c.startswith("ingest-")) or c == bridge):
                continue
            for t in ts:
                back = min((u for u, ub in ups if ub == "central" and u > t), default=t + 20)
                if t1 >= t - 2 and t0 <= back + 10:
                    return f"{b}'s queue for {c} was full ({b}'s log says it dropped, at +{rel(t):.0f} s)"
    return None

rows, unexplained, explained, gap_lines = {}, 0, 0, []
for node in sorted(node_site):
    missing = set(range(produced[node])) - set(got[node]) - pending[node]
    covered = {s for a, b in losses[node] for s in range(a, b + 1)}
    for a, b in ranges(missing - covered):
        seqs = got[node]
        before = max((s for s in seqs if s < a), default=None)
        after = min((s for s in seqs if s > b), default=None)
        t0 = seqs[before][0] if before is not None else t_start
        t1 = seqs[after][0] if after is not None else t_stop
        why = explain(node, t0, t1)
        n = b - a + 1
        if why:
            explained += n
        else:
            unexplained += n
        gap_lines.append(f"  {node}: seq {a}..{b} ({n}), written +{rel(t0):.0f}..+{rel(t1):.0f} s: "
                         + (why or "NOT EXPLAINED"))
    rows[node] = dict(site=node_site[node], produced=produced[node], received=received[node],
                      distinct=len(got[node]), dup=dup[node], missing=len(missing),
                      dataloss=len(losses[node]), pending=len(pending[node]),
                      historical=historical[node])

cols = [("written", "produced"), ("received", "received"), ("distinct", "distinct"),
        ("dups", "dup"), ("missing", "missing"), ("data-loss", "dataloss"),
        ("pending", "pending"), ("historical", "historical")]
def line(name, rs):
    return f"{name:<7} {len(rs):>5} " + " ".join(f"{sum(r[k] for r in rs):>{len(h)}}" for h, k in cols)
outage = next(u for u, b in ups if b == "central") - kills[0][0]
print(f"\nbridged sites: {len(rows)} nodes, outages of {outage:.0f} s, site saves "
      f"{'on every change' if site_autosave == 'each' else f'every {site_autosave} s'}, centre saves "
      f"{'on every change' if centre_autosave == 'each' else f'every {centre_autosave} s'}, "
      f"max_queued_messages {queue}, max_queued_bytes {queue_bytes}, {ingest} subscriptions; "
      f"{t_end - t_start:.0f} s")
print(f"{'site':<7} {'nodes':>5} " + " ".join(h for h, _ in cols))
for site in ("site-a", "site-b"):
    print(line(site, [r for r in rows.values() if r["site"] == site]))
print(line("total", list(rows.values())))
print(f"consumers ({'$share/ingest' if ingest == 'shared' else 'plain'}): " + ", ".join(f"{c} {n}" for c, n in per_consumer.items()))

# Each outage: what was written meanwhile, and when the last of it reached the centre.
down = []
for k, b in kills:
    u = next((t for t, ub in ups if ub == b and t > k), t_stop)
    down.append((k, u, b))
print("timeline (s from the start): " + ", ".join(
    f"{b} down +{rel(k):.0f}..+{rel(u):.0f}" for k, u, b in down) + f", nodes stopped +{rel(t_stop):.0f}")
for k, u, b in down:
    arr = [a for n in got for (ts, a) in got[n].values() if k <= ts <= u
           and (b == "central" or node_site[n] == b)]
    last = max((s for s in saves[b] if s <= k), default=None)
    print(f"  {b} killed at +{rel(k):.0f} s ({f'last save {k - last:.0f} s before' if last is not None else 'never saved'}): "
          f"{len(arr)} records written while down reached the centre"
          + (f", the last {max(arr) - u:.1f} s after it was back" if arr else ""))
sizes = dict(l.split() for l in open(f"{d}/db-sizes"))
for b in brokers:
    dr = ", ".join(f"{c} {len(ts)}x" for c, ts in drops[b].items()) or "none"
    print(f"  {b}: {len(saves[b])} database saves, database {int(sizes[b]) / 1024:.0f} KiB at the end, "
          f"'being dropped' in its log: {dr}")
if gap_lines:
    print("missing at the centre, not named by a data-loss event:")
    print("\n".join(gap_lines))

total = sum(r["distinct"] for r in rows.values())
dups = sum(r["dup"] for r in rows.values())
pend = sum(r["pending"] for r in rows.values())
if unexplained:
    print(f"verdict: FAIL: {unexplained} records acknowledged by a site broker never reached the centre, "
          f"and neither a data-loss event nor a Mosquitto limit that docs/fleet.md names explains them")
    sys.exit(1)
elif explained:
    print(f"verdict: LOSS AS DOCUMENTED: {explained} of {sum(produced.values())} records never reached "
          f"the centre, each by a Mosquitto limit that docs/fleet.md names (above); no data-loss event "
          f"names them: a broker had acknowledged them")
else:
    print(f"verdict: PASS: all {sum(produced.values())} records the {len(rows)} nodes wrote reached the "
          f"centre ({total} distinct, {dups} duplicates to drop on (node, inc, seq)"
          + (f", {pend} still in the outboxes at the stop" if pend else "") + ")")
PY
