"""How the MQTT aggregator scales: N devices, one local Mosquitto, one 2-core machine.

For N devices, the real aggregator service (`aggregator.service.Aggregator`, in its own process,
importing no torch) runs rounds of the demo model against N lightweight device clients (plain
paho clients in a few worker processes) that say hello and answer each announcement with a
realistic update: the demo model's shapes (2 experts, backbone, router, 2 head rows, Fisher
summaries) with random deltas, encoded with the fleet's codec (int8 + zstd here) and chunked by
the transport's framing. Updates are encoded before timing starts, so the clients only send.

Per round it reports: time from the announcement to the merged version's manifest (`round_s`),
time for the same update bytes to reach a passive subscriber (`receive_s`, the network's share),
both timed by that subscriber; their ratio (target <= 2); updates/s and MB/s through the
aggregator; and the aggregator process's peak resident memory.

    python benchmarks/mqtt_scale.py                   # N = 10, 100, 1000; 2 rounds each
    python benchmarks/mqtt_scale.py --devices 10 100  # a subset
    python benchmarks/mqtt_scale.py --update-workers 2  # updates judged in 2 processes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import paho.mqtt.client as mqtt
import psutil

from aggregator.service import ServiceHooks, first_model, open_aggregator
from aggregator.state import AggregatorState, StoredModel
from fedfmx.config import FleetConfig
from fedfmx.federation.aggregation import FISHER_PREFIX, HEAD_ROWS
from fedfmx.federation.rounds import RoundKeeper, expected_update_shapes
from fedfmx.wire.codec import encode_update
from fedfmx.wire.messages import CodecSettings, Hello, UpdateHeader
from transport import (
    MosquittoBroker,
    TopicKind,
    client_topic,
    clients_filter,
    decode_chunk,
    model_manifests_filter,
    parse_topic,
    round_topic,
    split_message,
)

RESULTS = Path(__file__).parent / "results"
WORKERS = 4
CODEC = CodecSettings(quantize="int8", zstd_level=3)
BROKER_LIMITS = [
    "max_queued_messages 0",  # no per-client queue cap: the aggregator may lag behind
    "max_inflight_messages 100",
    "max_connections -1",
]


def bench_fleet(devices: int, rounds: int, url: str, update_workers: int = 0) -> FleetConfig:
    return FleetConfig.model_validate(
        {
            "name": "scale",
            "method": "fedfmx",  # the SGD FedFMX: a realistic expert update per device
            "codec": CODEC.model_dump(),
            "protocol": {
                "num_clients": devices,
                "num_tasks": rounds,
                "rounds_per_task": 1,
                "max_lag": 0,
            },
            "service": {
                "broker": {"url": url, "protocol": "5"},
                "round_deadline_s": 3600.0,
                "min_devices": devices,
                "update_workers": update_workers,
            },
        }
    )


def device_name(index: int) -> str:
    return f"d{index:05d}"


def realistic_update(
    fleet: FleetConfig,
    weights: dict[str, np.ndarray],
    device: str,
    round_index: int,
    rng: np.random.Generator,
) -> bytes:
    """An update with the demo model's shapes, random deltas, this fleet's codec."""
    header = UpdateHeader(
        fleet=fleet.name,
        device_id=device,
        round=round_index,
        base_version=round_index,
        num_samples=500,
        expert_ids=[0, 1],
        head_classes=["c0", "c1"],
        class_counts=[250, 250],
        expert_usage=[250.0, 250.0] + [0.0] * (fleet.model.num_experts - 2),
        includes_backbone=True,
        includes_fisher=True,
        codec=fleet.uplink_codec,
        train_loss=0.5,
    )
    head_weights = dict(weights)
    head_weights["head.weight"] = np.zeros((2, fleet.model.feature_dim), dtype=np.float32)
    tensors = {
        name: (np.abs if name.startswith(FISHER_PREFIX) else np.asarray)(
            rng.normal(0.0, 0.01, size=shape).astype(np.float32)
        )
        for name, shape in expected_update_shapes(header, head_weights).items()
    }
    tensors[HEAD_ROWS] = rng.normal(0.0, 0.01, size=tensors[HEAD_ROWS].shape).astype(np.float32)
    return encode_update(header, tensors).payload


def run_aggregator(fleet_json: str, state_path: str, log_path: str) -> None:
    """Child process: the aggregator service alone (no torch), logging JSON events."""
    import logging

    from aggregator.events import EventFormatter

    handler = logging.FileHandler(log_path)
    handler.setFormatter(EventFormatter(as_json=True))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("transport").setLevel(logging.WARNING)
    fleet = FleetConfig.model_validate_json(fleet_json)
    aggregator = open_aggregator(fleet, Path(state_path), ServiceHooks())
    aggregator.start()
    aggregator.run()
    aggregator.session.close()
    assert "torch" not in sys.modules, "the aggregator imported torch"


def run_devices(
    url: str,
    fleet_name: str,
    names: list[str],
    payloads: dict[str, list[bytes]],
    ready: Any,
    done: Any,
) -> None:
    """Child process: paho clients that hello, then send their update for each round."""
    clients = []
    sent_rounds: dict[str, set[int]] = {name: set() for name in names}

    def on_message(client: mqtt.Client, name: str, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        signed = json.loads(decode_chunk(bytes(message.payload)).body)  # one-chunk message
        round_index = signed["announcement"]["round"]
        if round_index in sent_rounds[name] or round_index >= len(payloads[name]):
            return
        sent_rounds[name].add(round_index)
        topic = client_topic(fleet_name, name, TopicKind.UPDATE)
        for chunk in split_message(payloads[name][round_index], 128 * 1024):
            client.publish(topic, chunk, qos=1)

    for name in names:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5, userdata=name
        )
        client.max_queued_messages_set(0)
        client.on_message = on_message
        host, port = url.removeprefix("mqtt://").split(":")
        client.connect(host, int(port))
        client.loop_start()
        hello = Hello(
            fleet=fleet_name, device_id=name, profile="bench", classes_met=[], sample_counts={}
        )
        for chunk in split_message(hello.model_dump_json().encode(), 128 * 1024):
            client.publish(
                client_topic(fleet_name, name, TopicKind.HELLO), chunk, qos=1, retain=True
            )
        client.subscribe(round_topic(fleet_name), qos=1)
        clients.append(client)
    ready.set()
    done.wait()
    for client in clients:  # DISCONNECT first: each network loop then ends at once
        client.disconnect()
    for client in clients:
        client.loop_stop()


class Observer:
    """A passive subscriber timing the round on one clock: the announcement, every update
    packet (the bytes arriving, with no processing), and the merged model's manifest."""

    def __init__(self, url: str, fleet_name: str) -> None:
        self.opened: dict[int, float] = {}
        self.merged: dict[int, float] = {}
        self.arrivals: list[float] = []
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        for topic in (
            clients_filter(fleet_name, TopicKind.UPDATE),
            round_topic(fleet_name),
            model_manifests_filter(fleet_name),
        ):
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not message.payload:
            return
        address = parse_topic(message.topic)
        if address.kind is TopicKind.UPDATE:
            self.arrivals.append(now)
        elif address.kind is TopicKind.ROUND:
            signed = json.loads(decode_chunk(bytes(message.payload)).body)
            self.opened.setdefault(signed["announcement"]["round"], now)
        elif address.model_version:  # version v is the merge of round v - 1
            self.merged.setdefault(address.model_version - 1, now)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def events(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def measure(
    devices: int, rounds: int, profile: Path | None = None, update_workers: int = 0
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    with (
        MosquittoBroker(extra_config=BROKER_LIMITS) as broker,
        tempfile.TemporaryDirectory() as tmp,
    ):
        fleet = bench_fleet(devices, rounds, broker.url, update_workers)
        model = first_model(fleet)
        state_path = Path(tmp) / "state.sqlite"
        state = AggregatorState(state_path, fleet.name)
        keeper = RoundKeeper(fleet, model)
        state.save_first_model(
            StoredModel(0, keeper.model_payload(), model.class_names, model.expert_usage, None)
        )
        state.close()
        rng = np.random.default_rng(0)
        names = [device_name(i) for i in range(devices)]
        # Each round merges 2 new head rows per device; class names repeat, so shapes hold.
        payloads = {
            n: [realistic_update(fleet, model.weights, n, r, rng) for r in range(rounds)]
            for n in names
        }
        update_bytes = float(np.mean([len(p) for ps in payloads.values() for p in ps]))
        observer = Observer(broker.url, fleet.name)
        done = ctx.Event()
        workers = []
        for w in range(WORKERS):
            mine = names[w::WORKERS]
            ready = ctx.Event()
            process = ctx.Process(
                target=run_devices,
                args=(broker.url, fleet.name, mine, {n: payloads[n] for n in mine}, ready, done),
            )
            process.start()
            ready.wait(600)
            workers.append(process)
        log_path = Path(tmp) / "aggregator.jsonl"
        aggregator = ctx.Process(
            target=run_aggregator, args=(fleet.model_dump_json(), str(state_path), str(log_path))
        )
        aggregator.start()
        spy = None
        if profile is not None:  # py-spy samples the aggregator alone, every thread
            command = "py-spy record --threads --subprocesses -r 50 -f raw -o {} --pid {}"
            spy = subprocess.Popen(
                command.format(profile, aggregator.pid).split(),
                stdout=subprocess.DEVNULL,
            )
        peak = workers_peak = 0.0
        watched = psutil.Process(aggregator.pid)
        while aggregator.is_alive():
            try:
                peak = max(peak, watched.memory_info().rss / 2**20)
                children = [  # its update workers, if any (not multiprocessing's tracker)
                    c for c in watched.children() if "spawn_main" in " ".join(c.cmdline())
                ]
                workers_peak = max(workers_peak, sum(c.memory_info().rss for c in children) / 2**20)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.05)
        aggregator.join()
        if spy is not None:
            spy.wait(60)
        done.set()
        for process in workers:
            process.join(60)
        observer.close()
        if aggregator.exitcode != 0:
            raise SystemExit(f"aggregator failed: {log_path.read_text()[-2000:]}")
        log = events(log_path)
        per_round = []
        arrivals = np.array(observer.arrivals)
        for r in range(rounds):
            opened, merged = observer.opened[r], observer.merged[r]
            accepted = [e for e in log if e["event"] == "update_accepted" and e["round"] == r]
            window = arrivals[(arrivals >= opened) & (arrivals <= merged)]
            receive_s = float(window.max() - opened)
            round_s = merged - opened
            per_round.append(
                {
                    "round": r,
                    "updates": len(accepted),
                    "round_s": round_s,
                    "receive_s": receive_s,
                    "merge_over_receive": round_s / receive_s,
                    "updates_per_s": len(accepted) / round_s,
                    "mb_per_s": sum(e["bytes"] for e in accepted) / 2**20 / round_s,
                }
            )
        return {
            "devices": devices,
            "update_bytes_mean": update_bytes,
            "rounds": per_round,
            "aggregator_peak_rss_mb": peak,
            "update_workers_peak_rss_mb": workers_peak,
        }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    devices = [r["devices"] for r in results]
    round_s = [np.mean([x["round_s"] for x in r["rounds"]]) for r in results]
    receive_s = [np.mean([x["receive_s"] for x in r["rounds"]]) for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(devices, round_s, "o-", label="round (announce → merged)")
    left.loglog(devices, receive_s, "s--", label="bytes received by a passive subscriber")
    left.set_xlabel("devices")
    left.set_ylabel("seconds per round")
    left.legend()
    right.semilogx(devices, [r["aggregator_peak_rss_mb"] for r in results], "o-")
    right.set_xlabel("devices")
    right.set_ylabel("aggregator peak RSS (MB)")
    figure.suptitle("fedfmx-edge aggregator over Mosquitto (one 2-core machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--districts", type=int, help="Run the tree instead (see mqtt_tree.py): K districts."
    )
    parser.add_argument("--tree-devices", type=int, nargs="+", default=[10_000])
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record the aggregator with py-spy (raw stacks, one file per N, in --out)",
    )
    parser.add_argument(
        "--update-workers",
        type=int,
        default=0,
        help="service.update_workers: processes that decode, validate and fold updates",
    )
    args = parser.parse_args()
    if args.districts is not None:
        from mqtt_tree import main as tree_main  # benchmarks/ is this script's folder

        tree_main(args.districts, args.tree_devices, args.rounds, args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for devices in args.devices:
        profile = args.out / f"mqtt_scale_profile_{devices}.txt" if args.profile else None
        result = measure(devices, args.rounds, profile, args.update_workers)
        results.append(result)
        last = result["rounds"][-1]
        print(
            f"N={devices}: round {last['round_s']:.2f} s, receive {last['receive_s']:.2f} s, "
            f"ratio {last['merge_over_receive']:.2f}, {last['updates_per_s']:.0f} updates/s, "
            f"{last['mb_per_s']:.1f} MB/s, peak RSS {result['aggregator_peak_rss_mb']:.0f} MB",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": f"{psutil.cpu_count()} cores",
        "codec": CODEC.model_dump(),
        "update_workers": args.update_workers,
        "results": results,
    }
    (args.out / "mqtt_scale.json").write_text(json.dumps(document, indent=2))
    plot(results, args.out / "mqtt_scale.png")


if __name__ == "__main__":
    main()
