"""The tree at scale: K district aggregators, K + 1 bridged Mosquitto brokers, N devices.

`python benchmarks/mqtt_scale.py --districts 10 --tree-devices 10000` runs this: the brokers
and credentials `provision_tree` writes (mutual TLS everywhere, the bridges' ACL on the root),
the root aggregator and each district aggregator as their own `fedfmx-edge serve` processes
(no torch), and N lightweight devices (paho clients on one selector loop per worker process)
spread over the districts, each answering every announcement naming it with an update of the
demo model's shapes (int8 + zstd, as `mqtt_scale`'s flat devices send). Every device sends the
same tensors under its own header, so the districts validate, store and fold real payloads
without the benchmark spending minutes encoding them.

Per round: time from the first district's announcement to the merged version's manifest, both
seen by one subscriber on the root's broker; the partial bytes the root received; the peak RSS
of the root and of each district.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import selectors
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil

from aggregator.districts.provisioning import DeviceSetup, ProvisionedTree, provision_tree
from aggregator.provisioning import AGGREGATOR
from aggregator.service import first_model
from aggregator.state import AggregatorState, StoredModel
from fedfmx.config import FleetConfig
from fedfmx.federation.rounds import RoundKeeper
from fedfmx.wire.codec import UPDATE_MAGIC, frame, unframe
from fedfmx.wire.messages import Hello, UpdateHeader
from fedfmx_cli.tree_simulation import district_name, tree_brokers
from transport import TopicKind, client_topic, decode_chunk, free_port, split_message
from transport.district_topics import DistrictTopic, districts_filter
from transport.topics import model_manifests_filter, parse_topic, round_topic

CHUNK = 128 * 1024


def tree_fleet(base: FleetConfig, districts: int) -> FleetConfig:
    """`base` as the root of `districts` districts."""
    ids = [district_name(k) for k in range(districts)]
    return FleetConfig.model_validate(base.model_dump() | {"districts": {"ids": ids}})


def device_worker(
    fleet_name: str,
    devices: list[tuple[str, str, str, str, str]],
    template: dict[int, tuple[dict[str, Any], bytes]],
    ready: Any,
    done: Any,
) -> None:
    """Child process: paho clients (mutual TLS) on one selector loop: hello, then for each
    announcement naming them the round's update (the template body under their own header)."""
    selector = selectors.DefaultSelector()
    clients: dict[str, mqtt.Client] = {}
    answered: dict[str, set[int]] = {}

    def on_message(client: mqtt.Client, name: str, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        announcement = json.loads(decode_chunk(bytes(message.payload)).body)["announcement"]
        round_index = announcement["round"]
        if (
            announcement["closed"]
            or name not in announcement["participants"]
            or round_index in answered[name]
            or round_index not in template
        ):
            return
        answered[name].add(round_index)
        fields, body = template[round_index]
        header = UpdateHeader.model_validate(fields | {"device_id": name})
        topic = client_topic(fleet_name, name, TopicKind.UPDATE)
        for chunk in split_message(frame(UPDATE_MAGIC, header, body), CHUNK):
            client.publish(topic, chunk, qos=1)

    for name, host, port, ca, cert in devices:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{fleet_name}-{name}",
            protocol=mqtt.MQTTv5,
            userdata=name,
        )
        client.tls_set(ca_certs=ca, certfile=cert, keyfile=cert[: -len(".crt")] + ".key")
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        client.on_message = on_message
        client.connect(host, int(port))
        hello = Hello(
            fleet=fleet_name, device_id=name, profile="bench", classes_met=[], sample_counts={}
        )
        for chunk in split_message(hello.model_dump_json().encode(), CHUNK):
            client.publish(
                client_topic(fleet_name, name, TopicKind.HELLO), chunk, qos=1, retain=True
            )
        client.subscribe(round_topic(fleet_name), qos=1)
        clients[name] = client
        answered[name] = set()
        sock = client.socket()
        if sock is not None:
            selector.register(sock, selectors.EVENT_READ, client)
    ready.set()
    last_misc = 0.0
    while not done.is_set():
        for key, _ in selector.select(timeout=0.2):
            key.data.loop_read(max_packets=100)
        for client in clients.values():
            sock = client.socket()
            # TLS: decrypted bytes already read off the socket wait in the SSL object, and
            # select() does not see them
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                client.loop_read(max_packets=100)
            if client.want_write():
                client.loop_write()
        if time.monotonic() - last_misc > 1.0:
            last_misc = time.monotonic()
            for client in clients.values():
                client.loop_misc()
    for client in clients.values():
        client.disconnect()


class RootObserver:
    """One subscriber on the root's broker (the aggregator's identity, its own client id)."""

    def __init__(self, tree: ProvisionedTree, port: int, fleet: str) -> None:
        self.opened: dict[int, float] = {}
        self.merged: dict[int, float] = {}
        self.partial_bytes: dict[int, int] = {}
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="observer", protocol=mqtt.MQTTv5
        )
        creds = tree.root.clients[AGGREGATOR]
        self.client.tls_set(
            ca_certs=str(tree.root.ca_cert), certfile=str(creds.cert), keyfile=str(creds.key),
            cert_reqs=ssl.CERT_REQUIRED,
        )  # fmt: skip
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        for topic in (
            districts_filter(fleet, DistrictTopic.ROUND),
            districts_filter(fleet, DistrictTopic.PARTIAL),
            model_manifests_filter(fleet),
        ):
            self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        self._open_round = 0

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.time()
        if not message.payload:
            return
        if message.topic.endswith("/round"):
            announcement = json.loads(decode_chunk(bytes(message.payload)).body)["announcement"]
            if not announcement["closed"] and announcement["participants"]:
                self.opened.setdefault(announcement["round"], now)
                self._open_round = announcement["round"]
        elif message.topic.endswith("/partial"):
            round_index = self._open_round
            self.partial_bytes[round_index] = self.partial_bytes.get(round_index, 0) + len(
                message.payload
            )
        else:
            version = parse_topic(message.topic).model_version
            if version:
                self.merged.setdefault(version - 1, now)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def template_updates(fleet: FleetConfig, rounds: int) -> dict[int, tuple[dict[str, Any], bytes]]:
    """One encoded update per round (`mqtt_scale.realistic_update`), split into its header's
    fields and its body, which every device re-frames under its own id."""
    from mqtt_scale import realistic_update  # benchmarks/ is the running script's folder

    weights = first_model(fleet).weights
    rng = np.random.default_rng(0)
    template = {}
    for r in range(rounds):
        payload = realistic_update(fleet, weights, "d00000", r, rng)
        text, body = unframe(payload, UPDATE_MAGIC, len(payload))
        template[r] = (json.loads(text), body)
    return template


def _rss_mb(process: psutil.Process) -> float:
    try:
        return float(process.memory_info().rss) / 2**20
    except psutil.NoSuchProcess:
        return 0.0


def measure_tree(
    base: FleetConfig, devices: int, districts: int, rounds: int, workers: int, limits: list[str]
) -> dict[str, Any]:
    """Run `rounds` rounds of `devices` devices over `districts` districts; the figures."""
    fleet = tree_fleet(base, districts)
    ids = list(fleet.districts.ids) if fleet.districts else []
    names = [f"d{i:05d}" for i in range(devices)]
    members = {d: names[k::districts] for k, d in enumerate(ids)}
    ports: dict[str | None, int] = {None: free_port(), **{d: free_port() for d in ids}}
    with tempfile.TemporaryDirectory(prefix="fedfmx-tree-bench-") as tmp:
        work = Path(tmp)
        service = fleet.service.model_copy(update={"state_path": work / "root.sqlite"})
        fleet = fleet.model_copy(update={"service": service})
        started = time.perf_counter()
        tree = provision_tree(
            fleet, members, work / "tree", ports[None], {d: ports[d] for d in ids},
            device_setup=DeviceSetup(profile="generic-x86"),
        )  # fmt: skip
        provision_s = time.perf_counter() - started
        template = template_updates(fleet, rounds)
        # version 0 stored beforehand, as mqtt_scale does: the root then never imports torch
        model = first_model(fleet)
        state = AggregatorState(work / "root.sqlite", fleet.name)
        state.save_first_model(
            StoredModel(
                0, RoundKeeper(fleet, model).model_payload(), model.class_names,
                model.expert_usage, None,
            )
        )  # fmt: skip
        state.close()
        env = dict(os.environ)
        with tree_brokers(tree, ports, limits):
            observer = RootObserver(tree, ports[None], fleet.name)
            logs = work / "logs"
            logs.mkdir()

            def serve(*args: str, log: str) -> subprocess.Popen[bytes]:
                with (logs / log).open("wb") as sink:
                    return subprocess.Popen(
                        [sys.executable, "-m", "fedfmx_cli", "serve", "--json-logs", *args],
                        stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    )  # fmt: skip

            root = serve("--fleet", str(tree.fleet_file), log="root.log")
            district_processes = {
                d: serve("--district", str(tree.district_files[d]), log=f"{d}.log") for d in ids
            }
            ctx = mp.get_context("spawn")
            done = ctx.Event()
            pool = []
            connect_started = time.perf_counter()
            district_of = {name: d for d, mine in members.items() for name in mine}
            for w in range(workers):
                mine = []
                for name in names[w::workers]:
                    own = tree.districts[district_of[name]]
                    port = str(ports[district_of[name]])
                    cert = str(own.clients[name].cert)
                    mine.append((name, "127.0.0.1", port, str(own.ca_cert), cert))
                ready = ctx.Event()
                process = ctx.Process(
                    target=device_worker, args=(fleet.name, mine, template, ready, done)
                )
                process.start()
                pool.append((process, ready))
            for _, ready in pool:
                ready.wait(1200)
            connect_s = time.perf_counter() - connect_started
            watched = {"root": psutil.Process(root.pid)} | {
                d: psutil.Process(p.pid) for d, p in district_processes.items()
            }
            peaks = dict.fromkeys(watched, 0.0)
            while root.poll() is None:
                for who, process in watched.items():
                    peaks[who] = max(peaks[who], _rss_mb(process))
                time.sleep(0.2)
                if any(p.poll() not in (None, 0) for p in district_processes.values()):
                    break
            done.set()
            for process, _ in pool:
                process.join(60)
            for p in district_processes.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.terminate()
            observer.close()
            if root.returncode != 0:
                tail = (logs / "root.log").read_text()[-3000:]
                raise SystemExit(f"root failed ({root.returncode}): {tail}")
            per_round = []
            for r in range(rounds):
                opened, merged = observer.opened[r], observer.merged[r]
                per_round.append(
                    {
                        "round": r,
                        "round_s": merged - opened,
                        "root_partial_bytes": observer.partial_bytes.get(r, 0),
                    }
                )
        update_bytes = len(frame(UPDATE_MAGIC, UpdateHeader.model_validate(
            template[0][0] | {"device_id": names[0]}), template[0][1]))  # fmt: skip
        return {
            "devices": devices,
            "districts": districts,
            "update_bytes": update_bytes,
            "device_bytes_per_round": update_bytes * devices,
            "provision_s": provision_s,
            "connect_s": connect_s,
            "rounds": per_round,
            "root_peak_rss_mb": peaks["root"],
            "district_peak_rss_mb": {d: peaks[d] for d in ids},
        }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    devices = [r["devices"] for r in results]
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 4))
    left.plot(devices, [np.mean([x["round_s"] for x in r["rounds"]]) for r in results], "o-")
    left.set_xlabel("devices")
    left.set_ylabel("seconds per round (announce → merged)")
    middle.plot(
        devices, [r["device_bytes_per_round"] / 2**20 for r in results], "s--",
        label="device updates (into the districts)",
    )  # fmt: skip
    middle.plot(
        devices,
        [np.mean([x["root_partial_bytes"] for x in r["rounds"]]) / 2**20 for r in results],
        "o-", label="partials (into the root)",
    )  # fmt: skip
    middle.set_xlabel("devices")
    middle.set_ylabel("MB per round")
    middle.legend()
    right.plot(devices, [r["root_peak_rss_mb"] for r in results], "o-", label="root")
    right.plot(
        devices, [max(r["district_peak_rss_mb"].values()) for r in results], "s--",
        label="largest district",
    )  # fmt: skip
    right.set_xlabel("devices")
    right.set_ylabel("peak RSS (MB)")
    right.legend()
    districts = results[0]["districts"]
    figure.suptitle(f"fedfmx-edge tree: {districts} districts over bridged Mosquitto (2 cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(districts: int, device_counts: list[int], rounds: int, out: Path) -> None:
    from mqtt_scale import BROKER_LIMITS, CODEC, bench_fleet

    results = []
    for devices in device_counts:
        base = bench_fleet(devices, rounds, "mqtt://127.0.0.1:1")
        workers = max(2, min(8, devices // 1000))
        result = measure_tree(base, devices, districts, rounds, workers, BROKER_LIMITS)
        results.append(result)
        last = result["rounds"][-1]
        print(
            f"N={devices}, K={districts}: round {last['round_s']:.1f} s, root received "
            f"{last['root_partial_bytes'] / 2**20:.1f} MB of partials (devices sent "
            f"{result['device_bytes_per_round'] / 2**20:.0f} MB), root RSS "
            f"{result['root_peak_rss_mb']:.0f} MB, districts up to "
            f"{max(result['district_peak_rss_mb'].values()):.0f} MB",
            flush=True,
        )
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "machine": f"{psutil.cpu_count()} cores",
        "load_before": os.getloadavg(),
        "codec": CODEC.model_dump(),
        "results": results,
    }
    (out / "mqtt_tree.json").write_text(json.dumps(document, indent=2))
    plot(results, out / "mqtt_tree.png")
