#!/usr/bin/env python3
"""A fleet-side consumer of gpulet's MQTT topics (docs/mqtt.md), in a few dozen lines.

It follows every node's power against its budget (`telemetry`), says when a node comes
online or goes offline (`status`, retained, with the broker's last will), and, given a
key made by `gpulet keygen`, sends a node a signed `set-power-budget` and prints the
result. Needs paho-mqtt and cryptography (requirements.txt).

    consumer.py --broker mqtt://broker:1883                      # watch
    consumer.py --broker mqtt://broker:1883 --node gpu-a01 --set-budget 3500 --key ops.key
"""
import argparse, base64, json, sys, time, uuid
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def signed(node, name, payload, key_file):
    """The command payload with issued/expires times and its Ed25519 signature."""
    seed = base64.b64decode(open(key_file).read().strip())
    now = int(time.time() * 1000)
    p = dict(payload, id=str(uuid.uuid4()), issued_ms=now, expires_ms=now + 60_000)
    body = json.dumps(p, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    msg = f"gpulet-cmd-v1\n{node}\n{name}\n{body}".encode()
    p["sig"] = base64.b64encode(Ed25519PrivateKey.from_private_bytes(seed).sign(msg)).decode()
    return p


def main():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    a.add_argument("--root", default="gpulet/v1")
    a.add_argument("--node", help="the node a command goes to")
    a.add_argument("--set-budget", type=float, metavar="WATTS")
    a.add_argument("--key", help="private key from `gpulet keygen` (signs the command)")
    a.add_argument("--seconds", type=float, default=0, help="stop after this long (0: never)")
    a.add_argument("--json", action="store_true", help="one JSON object a line")
    args = a.parse_args()

    def say(text, **fields):
        print(json.dumps(fields) if args.json else text, flush=True)

    def on_connect(client, _userdata, _flags, _reason, _props):
        client.subscribe([(f"{args.root}/+/status", 1), (f"{args.root}/+/telemetry", 0),
                          (f"{args.root}/+/cmd-result/#", 1)])
        if args.set_budget is not None:
            cmd = signed(args.node, "set-power-budget", {"watts": args.set_budget}, args.key)
            client.publish(f"{args.root}/{args.node}/cmd/set-power-budget", json.dumps(cmd), qos=1)

    def on_message(_client, _userdata, m):
        node, kind = m.topic[len(args.root) + 1:].split("/")[:2]
        if not m.payload:
            return
        p = json.loads(m.payload)
        if kind == "status":
            say(f"{node} {p['state']} (incarnation {p.get('inc')})", node=node, state=p["state"])
        elif kind == "telemetry":
            power, budget = p["power_w"], p.get("budget_w")
            share = f" of {budget:.0f} W ({power / budget:.0%})" if budget else " (no budget)"
            say(f"{node} {power:.0f} W{share}", node=node, power_w=power, budget_w=budget)
        elif kind == "cmd-result":
            say(f"{node} {p.get('command')}: {p['status']} {p.get('detail') or p.get('reason') or ''}",
                node=node, command=p.get("command"), status=p["status"])

    url = urlparse(args.broker)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect, client.on_message = on_connect, on_message
    client.connect(url.hostname, url.port or 1883)
    client.loop_start()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    client.loop_stop()


if __name__ == "__main__":
    sys.exit(main())
