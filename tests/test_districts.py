"""District aggregators over bridged Mosquitto brokers: the tree merges as the flat fleet does,
a district killed mid-round is counted once, bridges survive broker restarts, a district that
stays down does not stall the root, hostile partials are refused with a reason."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from aggregator.districts.provisioning import bridge_lines, district_acl_lines
from fedfmx.config import parse_fleet
from fedfmx.errors import ConfigError, FedFMXError
from fedfmx.federation.aggregation import MergeSums, WeightedSum
from fedfmx.federation.rounds import GlobalModel
from fedfmx.wire.messages import DistrictReport
from fedfmx.wire.partials import PartialHeader, encode_partial
from tests.district_helpers import DEVICES, Tree, flat_models, running_tree, tree_fleet
from transport import MqttSession, find_mosquitto
from transport.district_topics import DistrictTopic, district_topic
from transport.session import session_settings

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
ALL = [f"device-{i:03d}" for i in range(DEVICES)]


def assert_same_model(tree_model: GlobalModel, flat_model: GlobalModel) -> None:
    """Equal up to the order of float64 additions (then rounded to float32)."""
    assert tree_model.version == flat_model.version
    assert tree_model.class_names == flat_model.class_names
    assert tree_model.weights.keys() == flat_model.weights.keys()
    for name, value in flat_model.weights.items():
        np.testing.assert_allclose(tree_model.weights[name], value, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(tree_model.expert_usage, flat_model.expert_usage, rtol=1e-12)


def finished(tree: Tree) -> bool:
    return tree.root.finished


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("merge", ["median", "trimmed_mean"])
def test_robust_merges_are_refused_with_districts(merge: str) -> None:
    document = tree_fleet().model_dump(mode="json")
    document["robustness"]["merge"] = merge
    with pytest.raises(ConfigError, match="not associative"):
        parse_fleet(document)


def test_root_acl_confines_a_district_to_its_own_topics() -> None:
    lines = district_acl_lines("tree", "district-00")
    assert lines[0] == "user district-00"
    assert "topic write fedfmx/v1/tree/districts/district-00/partial" in lines
    assert "topic read fedfmx/v1/tree/districts/district-00/round" in lines
    assert not any("district-01" in line or "readwrite" in line for line in lines)


# -- the tree over real brokers ----------------------------------------------------------------


@needs_mosquitto
def test_tree_merges_exactly_as_the_flat_fleet_with_tls_bridges(tmp_path: Path) -> None:
    with running_tree(tmp_path, tree_fleet()) as tree:
        conf = tree.tree.districts["district-00"].mosquitto_conf.read_text()
        assert "bridge_certfile" in conf and "try_private true" in conf
        for district in tree.tree.districts:
            tree.start_district(district)
        assert tree.wait_until(lambda: finished(tree), 60), tree.log("district-00")[-3000:]
        models = flat_models(tree.fleet, [ALL] * 2)
        assert_same_model(tree.root.keeper.model, models[-1])
        totals = tree.root.state.round_totals()
        assert [t.updates for t in totals] == [2, 2]  # one partial per district per round


@needs_mosquitto
def test_district_killed_mid_round_and_after_storing_its_partial_is_counted_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with running_tree(tmp_path, tree_fleet()) as tree:
        tree.start_district("district-01")
        for crash_at in ("update_stored:1", "district_partial_stored:1"):
            tree.start_district("district-00", crash_at)
            process = tree.processes["district-00"]
            assert tree.wait_until(lambda p=process: p.poll() is not None, 60), crash_at
            assert process.returncode == -signal.SIGKILL, tree.log("district-00")[-2000:]
        tree.start_district("district-00")
        assert tree.wait_until(lambda: finished(tree), 60), tree.log("district-00")[-3000:]
        models = flat_models(tree.fleet, [ALL] * 2)
        assert_same_model(tree.root.keeper.model, models[-1])
    # the district re-sent its partials until the root closed the round: counted once each
    accepted = [r for r in caplog.records if getattr(r, "event", "") == "partial_accepted"]
    assert sorted((r.fields["round"], r.fields["district"]) for r in accepted) == [  # type: ignore[attr-defined]
        (0, "district-00"), (0, "district-01"), (1, "district-00"), (1, "district-01"),
    ]  # fmt: skip
    assert "round_resumed" in tree.log("district-00")


@needs_mosquitto
def test_the_run_completes_across_district_and_root_broker_restarts(tmp_path: Path) -> None:
    with running_tree(tmp_path, tree_fleet()) as tree:
        for district in tree.tree.districts:
            tree.start_district(district)
        assert tree.wait_until(lambda: tree.root.keeper.model.version >= 1, 60)
        tree.brokers["district-01"].restart()
        tree.brokers[None].restart()
        assert tree.wait_until(lambda: finished(tree), 90), tree.log("district-01")[-3000:]
        assert_same_model(tree.root.keeper.model, flat_models(tree.fleet, [ALL] * 2)[-1])


@needs_mosquitto
def test_a_district_that_stays_down_does_not_stall_the_root(tmp_path: Path) -> None:
    # quorum 0.5: district-00's 2 of 4 devices close a round at its deadline
    fleet = tree_fleet(deadline_s=6.0, grace_s=1.0, rounds=3, dormant_after=1)
    with running_tree(tmp_path, fleet) as tree:
        for district in tree.tree.districts:
            tree.start_district(district)
        assert tree.wait_until(lambda: tree.root.keeper.model.version >= 1, 60)
        tree.processes["district-01"].kill()  # and never restarted
        assert tree.wait_until(lambda: finished(tree), 60)
        present = ["device-000", "device-002"]  # district-00's: device i in district i mod 2
        expected = flat_models(tree.fleet, [ALL, present, present])[-1]
        assert_same_model(tree.root.keeper.model, expected)
        totals = tree.root.state.round_totals()
        assert [t.updates for t in totals] == [2, 1, 1]
        # round 1 still named district-01's devices and closed at its deadline; by round 2
        # the district was neither heard from nor answering: left out
        assert [t.participants for t in totals] == [4, 4, 2]
        assert (totals[1].closed or 0) - totals[1].opened >= 6.0


@needs_mosquitto
def test_hostile_partials_are_refused_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with running_tree(tmp_path, tree_fleet()) as tree:
        fleet = tree.fleet
        url = f"mqtts://127.0.0.1:{tree.brokers[None].port}"
        # Speaking as district-00 on the root's broker, with its bridge's certificate.
        broker = tree.tree.root.broker_section("district-00", url)
        session = MqttSession(session_settings(broker, "tree-district-00-test"))
        session.connect()
        report = DistrictReport(
            fleet=fleet.name, district="district-00", devices=["device-000", "device-002"],
            registered=2, sent_unix=time.time(),
        )  # fmt: skip
        status = district_topic(fleet.name, "district-00", DistrictTopic.STATUS)
        session.publish(status, report.model_dump_json().encode(), retain=True)
        too_many = report.model_copy(
            update={"devices": [f"x{i}" for i in range(fleet.device_capacity + 1)]}
        )
        other = district_topic(fleet.name, "district-01", DistrictTopic.STATUS)
        with pytest.raises(FedFMXError, match="Not authorized"):  # the root's ACL
            session.publish(other, report.model_dump_json().encode())
        session.publish(status, too_many.model_dump_json().encode())
        session.publish(status, report.model_dump_json().encode(), retain=True)
        tree.start_district("district-01")
        assert tree.wait_until(lambda: tree.root.keeper.current is not None, 60)
        assert tree.root.keeper.current is not None
        assert len(tree.root.keeper.current.announcement.participants) == DEVICES
        weights = tree.root.keeper.model.weights
        name = next(n for n in weights if n.startswith("router."))
        shape = weights[name].shape
        usage = np.ones(fleet.model.num_experts)
        huge = MergeSums(updates=1, usage=usage)
        huge.shared[name] = WeightedSum(np.full(shape, 1e9), np.ones(shape))
        nan = MergeSums(updates=1, usage=usage)
        nan.shared[name] = WeightedSum(np.full(shape, np.nan), np.ones(shape))
        empty = PartialHeader(
            fleet=fleet.name, district="district-00", round=0, base_version=0, updates=0,
            answered=0, head_classes=[], new_classes=[], update_bytes=0,
        )  # fmt: skip
        one = empty.model_copy(update={"updates": 1, "answered": 1})
        payloads = {
            "bad magic": b"garbage" * 10,
            "beyond max_update_norm": encode_partial(one, huge),
            "not finite": encode_partial(one, nan),
            "came from": encode_partial(
                empty.model_copy(update={"district": "district-01"}), MergeSums()
            ),
            "participants": encode_partial(empty.model_copy(update={"answered": 9}), MergeSums()),
            "round 5": encode_partial(empty.model_copy(update={"round": 5}), MergeSums()),
        }
        topic = district_topic(fleet.name, "district-00", DistrictTopic.PARTIAL)
        for payload in payloads.values():
            session.publish(topic, payload)
        # the root's ACL: district-00 cannot publish as district-01
        forged = district_topic(fleet.name, "district-01", DistrictTopic.PARTIAL)
        with pytest.raises(FedFMXError, match="Not authorized"):
            session.publish(forged, b"forged", timeout_s=5)
        session.close()

        def reasons() -> list[str]:
            return [reason for _, _, reason in tree.root.state.rejections()]

        assert tree.wait_until(lambda: len(reasons()) >= len(payloads) + 1, 30), reasons()
        assert any("a district may bring at most" in reason for reason in reasons())
        for expected in payloads:
            assert any(expected in reason for reason in reasons()), (expected, reasons())
        assert {who for _, who, _ in tree.root.state.rejections()} == {"district-00"}
        current = tree.root.keeper.current
        assert current is not None and "district-00" not in current.received
    logged = [r for r in caplog.records if getattr(r, "event", "") == "update_rejected"]
    assert len(logged) == len(payloads)  # the partials (the report's is a message_rejected)
    assert all(r.fields["reason"].startswith("partial: ") for r in logged)  # type: ignore[attr-defined]


@needs_mosquitto
def test_a_flooding_district_is_throttled_with_one_logged_rejection(tmp_path: Path) -> None:
    document = tree_fleet().model_dump(mode="json")
    document["service"]["rate_limit"] = {"messages_per_s": 0.5, "burst": 3}
    with running_tree(tmp_path, parse_fleet(document)) as tree:  # no district started
        url = f"mqtts://127.0.0.1:{tree.brokers[None].port}"
        broker = tree.tree.root.broker_section("district-00", url)
        session = MqttSession(session_settings(broker, "tree-district-00-flood"))
        session.connect()
        report = DistrictReport(
            fleet=tree.fleet.name, district="district-00", devices=["device-000"],
            registered=1, sent_unix=time.time(),
        )  # fmt: skip
        status = district_topic(tree.fleet.name, "district-00", DistrictTopic.STATUS)
        for _ in range(30):
            session.publish(status, report.model_dump_json().encode())
        session.close()

        def throttled() -> list[str]:
            rows = tree.root.state.rejections()
            return [reason for _, who, reason in rows if who == "district-00"]

        assert tree.wait_until(lambda: any("rate limit" in r for r in throttled()), 30)
        time.sleep(1.0)  # the rest of the flood: counted, not stored one by one
        assert [r for r in throttled() if "rate limit" in r] == [throttled()[0]]


def test_bridge_maps_the_districts_round_onto_its_own_round_topic(tmp_path: Path) -> None:
    from aggregator.provisioning import provision

    root = provision("tree", ["district-00"], tmp_path)
    lines = bridge_lines("tree", "district-00", "127.0.0.1", 8883, root)
    assert "topic round in 1 fedfmx/v1/tree/ fedfmx/v1/tree/districts/district-00/" in lines
    assert "topic fedfmx/v1/tree/model/# in 1" in lines
    assert f"bridge_certfile {root.clients['district-00'].cert}" in lines


def test_provision_writes_a_tree_of_bridged_brokers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedfmx_cli.main import app

    out = tmp_path / "tree"
    outcome = CliRunner().invoke(
        app,
        [
            "provision", "--out", str(out), "--devices", "4", "--districts", "2", "--port", "9000",
            "--district-host", "site-a", "--district-host", "site-b",
        ],
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    root_acl = (out / "root" / "acl").read_text()
    assert "user district-01" in root_acl and "districts/district-01/partial" in root_acl
    conf = (out / "district-01" / "mosquitto.conf").read_text()
    assert "address localhost:9000" in conf and "listener 9002" in conf
    assert f"bridge_certfile {out / 'root' / 'district-01.crt'}" in conf
    device = yaml.safe_load((out / "district-01" / "device-001.yaml").read_text())
    assert device["broker"]["url"] == "mqtts://site-b:9002"
    assert device["data"]["client_index"] == 1
    assert device["fleet_public_key"].endswith("root/aggregator-signing.pub")
