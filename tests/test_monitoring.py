"""Metrics and the status page of a running aggregator, over HTTP.

A real fleet (a Mosquitto, the aggregator, two devices: 2 tasks x 1 round of digits) runs with
the metrics endpoint and the page served; afterwards the scraped counters must equal what the
SQLite state holds, the page (rendered by headless Chromium where the `chromium` package is
installed) must show every device, and `fedfmx-edge serve` itself must tell systemd READY=1,
WATCHDOG=1 and STOPPING=1 while serving /metrics and the page.

Set FEDFMX_DOCS_SCREENSHOT=1 to write docs/status-page.png from the fleet run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from fleet_helpers import (
    device_yaml,
    run_to_end,
    small_fleet,
    stop_and_expect_stopping,
    write_fleet,
)
from prometheus_client.parser import text_string_to_metric_families

from aggregator.monitoring import rejection_bucket, serve_metrics
from aggregator.service import ServiceHooks, open_aggregator
from aggregator.state import AggregatorState
from aggregator.status_page import serve_status_page
from fedfmx.federation.simulation import load_fleet_dataset, task_evaluator
from transport import MosquittoBroker, MqttSession, SessionSettings, free_port

DOCS = Path(__file__).parent.parent / "docs"


def scrape(port: int) -> dict[str, float]:
    """Every sample of http://127.0.0.1:port/metrics as `name{labels}` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def test_rejection_reasons_fall_into_bounded_buckets() -> None:
    assert rejection_bucket("update norm 3.1e+04 exceeds the bound 12") == "norm_bound"
    assert rejection_bucket("rate limit: over 20 messages/s (burst 40)") == "rate_limit"
    assert rejection_bucket("device 'x' is not a participant of round 3") == "not_participant"
    assert rejection_bucket("malformed hello (3 errors)") == "malformed"
    assert rejection_bucket("not a FMXU payload (bad magic)") == "malformed"
    assert rejection_bucket("payload of 99 bytes exceeds the 10-byte limit") == "too_large"
    assert rejection_bucket("something nobody foresaw") == "other"


def test_metrics_and_page_of_a_real_fleet_match_the_state(
    mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    broker = mosquitto_broker
    fleet = small_fleet(broker.url)
    state_path = tmp_path / "aggregator.sqlite"
    hooks = ServiceHooks(evaluate=task_evaluator(fleet, load_fleet_dataset(fleet)))
    aggregator = open_aggregator(fleet, state_path, hooks)
    metrics_port, page_port = free_port(), free_port()
    with (
        serve_metrics(aggregator.state, metrics_port, "127.0.0.1"),
        serve_status_page(
            aggregator.state, fleet.name, fleet.protocol.num_rounds, page_port, "127.0.0.1"
        ),
    ):
        aggregator.start()
        # A hostile hello (malformed) shows up as a bucketed message rejection.
        with MqttSession(SessionSettings(url=broker.url, client_id="intruder")) as intruder:
            intruder.connect()
            intruder.publish(f"fedfmx/v1/{fleet.name}/clients/intruder/hello", b"{not json")
        fleet_file = write_fleet(tmp_path, fleet)
        clients = range(fleet.protocol.num_clients)
        run_to_end(aggregator, [device_yaml(tmp_path, fleet_file, i, broker.url) for i in clients])

        metrics = scrape(metrics_port)
        state = AggregatorState(state_path, fleet.name)
        rounds = state.round_totals()
        assert metrics["fedfmx_rounds_closed_total"] == fleet.protocol.num_rounds == len(rounds)
        assert metrics["fedfmx_updates_accepted_total"] == sum(r.updates for r in rounds) > 0
        assert metrics["fedfmx_update_received_bytes_total"] == sum(r.uplink_bytes for r in rounds)
        assert metrics['fedfmx_messages_rejected_total{reason="malformed"}'] == 1
        assert metrics["fedfmx_merge_duration_seconds_count"] == len(rounds)
        assert metrics["fedfmx_round_duration_seconds_count"] == len(rounds)
        assert metrics["fedfmx_model_published_bytes_total"] > 0
        assert metrics["fedfmx_devices_registered"] == fleet.protocol.num_clients
        assert metrics["fedfmx_model_version"] == len(rounds)
        assert all(name.startswith("fedfmx_") for name in metrics)

        devices = state.devices()
        statuses = [d.status for d in devices]
        assert all(s.rss_mb and s.rss_mb > 10 for s in statuses)  # health in retained status
        assert all(s.disk_free_mb and s.disk_free_mb > 0 for s in statuses)
        state.close()

        code, page = get(f"http://127.0.0.1:{page_port}/")
        assert code == 200
        for device in devices:
            assert device.device_id in page
        assert "Accuracy over time" in page and "<svg" in page and "malformed" in page
        code, _ = get(f"http://127.0.0.1:{page_port}/nope")
        assert code == 404
        _check_in_chromium(
            f"http://127.0.0.1:{page_port}/", [d.device_id for d in devices], tmp_path
        )
    aggregator.session.close()
    aggregator.state.close()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _check_in_chromium(url: str, device_ids: list[str], tmp_path: Path) -> None:
    """The page as a browser renders it: its DOM has every device, and a screenshot."""
    binary = _chromium()
    if binary is None:  # the HTTP checks above ran and passed; only the browser's is left out
        pytest.skip("the page in a browser needs chromium: `apt-get install chromium`")
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
    ).stdout
    assert all(device in dom for device in device_ids)
    assert "<table>" in dom
    screenshot = (
        DOCS / "status-page.png"
        if os.environ.get("FEDFMX_DOCS_SCREENSHOT") == "1"
        else tmp_path / "status-page.png"
    )
    subprocess.run(
        [*flags, "--window-size=1280,760", f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one


def test_serve_notifies_systemd_and_serves_metrics_and_page(
    mosquitto_broker: MosquittoBroker, tmp_path: Path
) -> None:
    broker = mosquitto_broker
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(yaml.safe_dump(small_fleet(broker.url).model_dump(mode="json")))
    notify = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    metrics_port, page_port = free_port(), free_port()
    environment = dict(os.environ, NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="400000")
    command = [
        sys.executable, "-m", "fedfmx_cli", "serve", "--fleet", str(fleet_file),
        "--state", str(tmp_path / "state.sqlite"), "--metrics-port", str(metrics_port),
        "--http-port", str(page_port),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
    try:
        first = listener.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=fleet ci-digits, model version 0")
        assert listener.recv(4096) == b"WATCHDOG=1"
        assert listener.recv(4096) == b"WATCHDOG=1"  # fed again: the loop keeps turning
        metrics = scrape(metrics_port)
        assert metrics["fedfmx_model_version"] == 0
        assert metrics["fedfmx_devices_online"] == 0
        assert metrics["fedfmx_round"] == -1
        code, page = get(f"http://127.0.0.1:{page_port}/")
        assert code == 200 and "no device has said hello" in page
        stop_and_expect_stopping(process, listener)
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()
    assert "Traceback" not in (process.stderr.read() if process.stderr else "")
