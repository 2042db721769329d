"""A long broker outage during a real `musc-edge run`, measured by hand (the test does a
short one): Mosquitto stops for --outage seconds while parts keep arriving, then comes back;
a subscriber with a persistent session counts what arrived, by record id.

    python tools/broker_outage.py --model PKG --good ../shared/data/mvtec_ad/bottle/train/good \
        --outage 600 --json outage.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion
from sink_receivers import free_port, start_mosquitto  # beside this script in tools/

from musc_edge.images import list_images
from musc_edge.runtime.journal import Journal

MOSQUITTO = "/usr/sbin/mosquitto"


def subscribe(port: int, topic: str, received: list[str]) -> Client:
    """A receiver that keeps its session across broker restarts (QoS 1, clean_session off)."""
    client = Client(CallbackAPIVersion.VERSION2, client_id="outage-receiver", clean_session=False)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = lambda c, u, message: received.append(json.loads(message.payload)["id"])
    client.reconnect_delay_set(0.2, 2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--good", type=Path, required=True, help="images to feed as parts")
    parser.add_argument("--outage", type=float, default=600.0, help="seconds the broker is down")
    parser.add_argument("--every", type=float, default=4.0, help="seconds between parts")
    parser.add_argument("--before", type=int, default=10, help="parts before the outage")
    parser.add_argument("--after", type=int, default=10, help="parts after it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="musc-outage-"))
    camera, out, broker_dir = work / "camera", work / "out", work / "broker"
    for folder in (camera, broker_dir):
        folder.mkdir()
    port = free_port()
    broker = start_mosquitto(MOSQUITTO, broker_dir, port, persistent=True)
    received: list[str] = []
    receiver = subscribe(port, "musc/line1/cam1/result", received)
    sink = f"mqtt:host=127.0.0.1,port={port},line=line1,station=cam1,heartbeat_s=2"
    command = [
        *(shutil.which("musc-edge") or "musc-edge", "run", "--camera-dir", str(camera)),
        *("--model", str(args.model), "--out", str(out), "--mode", "rolling"),
        *("--batch-size", "8", "--settle", "0.2", "--engine", "onnxruntime", "--sink", sink),
    ]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    images = list_images(args.good)
    total = args.before + args.after
    outage_parts = max(1, int(args.outage / args.every))
    feed_done = threading.Event()

    def feed() -> None:
        """Parts arrive at a steady pace before, during and after the outage."""
        for index in range(total + outage_parts):
            source = images[index % len(images)]
            staging = work / f".{index:05d}.png"
            shutil.copyfile(source, staging)
            staging.replace(camera / f"part_{index:05d}.png")
            time.sleep(args.every)
        feed_done.set()

    threading.Thread(target=feed, daemon=True).start()
    time.sleep(args.before * args.every)
    broker.terminate()
    broker.wait(10)
    down_at = time.monotonic()
    print(f"broker down for {args.outage:.0f} s ...", flush=True)
    time.sleep(args.outage)
    broker = start_mosquitto(MOSQUITTO, broker_dir, port, persistent=True)
    print(f"broker back after {time.monotonic() - down_at:.0f} s", flush=True)
    feed_done.wait()
    time.sleep(10)
    run.send_signal(signal.SIGTERM)
    run.wait(120)
    sent = [record.record_id for record in Journal(out).records()]
    deadline = time.monotonic() + 60
    while set(sent) - set(received) and time.monotonic() < deadline:
        time.sleep(0.5)
    receiver.loop_stop()
    broker.terminate()
    lost = sorted(set(sent) - set(received))
    report = {
        "outage_s": args.outage,
        "parts_in_journal": len(sent),
        "received_messages": len(received),
        "received_ids": len(set(received)),
        "duplicates": len(received) - len(set(received)),
        "lost": len(lost),
        "in_order": [i for i in dict.fromkeys(received) if i in set(sent)] == sent,
        "run_exit": run.returncode,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
