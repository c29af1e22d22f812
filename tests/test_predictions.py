"""Predictions on unlabelled frames: the JSON-lines format, the calibrated threshold, the queue."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from stream_images import digit_pixels

from edge_client.predictions import LabelQueue, Served, StreamPredictor, scores
from edge_client.sources.base import Sample
from edge_client.stream_config import PredictionsConfig
from fedfmx.config import ImageInputConfig
from fedfmx.data.preprocessing import model_input

SPEC = ImageInputConfig(channels=1, height=8, width=8)


def nearest_mean(labels: list[int]) -> Served:
    """A real (if simple) classifier: logits = −distance to each class's mean digit."""
    means = np.stack(
        [np.mean([model_input(p, SPEC) for p in digit_pixels(c, 20)], axis=0) for c in labels]
    ).reshape(len(labels), -1)

    def logits(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)
        return -20 * np.linalg.norm(flat[:, None] - means[None], axis=2)

    return Served(3, logits, [str(c) for c in labels])


def frame(label: int, index: int) -> Sample:
    return Sample(digit_pixels(label, 1, start=index)[0], None, f"cam#{index}", time.time())


def test_scores_are_softmax_probability_and_energy() -> None:
    logits = np.array([[2.0, 0.0, -1.0]])
    ids, probability, energy = scores(logits)
    expected = np.exp(2) / np.exp([2.0, 0.0, -1.0]).sum()
    assert ids.tolist() == [0]
    np.testing.assert_allclose(probability, [expected], rtol=1e-6)
    np.testing.assert_allclose(energy, [-np.log(np.exp([2.0, 0.0, -1.0]).sum())], rtol=1e-6)


def test_each_prediction_is_one_json_line_and_unsure_frames_are_queued(tmp_path: Path) -> None:
    config = PredictionsConfig(output="out/predictions.jsonl", unsure_quantile=0.2, to_label_max=3)
    published: list[bytes] = []
    predictor = StreamPredictor("cam-1", SPEC, config, tmp_path, publish=published.append)
    before = predictor.classify(frame(0, 30))  # nothing serves yet: unsure, queued
    assert before["model_version"] is None and before["unsure"] is True
    served = nearest_mean([0, 1])
    labelled = np.stack([model_input(p, SPEC) for p in digit_pixels(0, 10) + digit_pixels(1, 10)])
    predictor.serve(served, labelled, np.array(["0"] * 10 + ["1"] * 10))
    _, probability, _ = scores(served.logits(labelled))
    assert predictor.threshold == np.quantile(probability, 0.2)
    records = [predictor.classify(frame(label, 40 + i)) for i, label in enumerate([0, 1] * 5)]
    records.append(predictor.classify(frame(7, 50)))  # a digit the model never learnt
    predictor.close()
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(json.dumps(before)), *records]
    assert published == []  # mqtt is off unless configured
    for record in records:
        assert set(record) == {
            "time",
            "device_id",
            "origin",
            "model_version",
            "class",
            "class_id",
            "probability",
            "energy",
            "unsure",
            "threshold",
            "latency_s",
        }
        assert record["model_version"] == 3 and record["device_id"] == "cam-1"
        assert str(record["time"]).endswith("Z") and 0 <= float(record["latency_s"]) < 5
    right = sum(r["class"] == str(label) for r, label in zip(records, [0, 1] * 5, strict=False))
    assert right >= 8
    assert records[-1]["unsure"] is True  # the unknown digit is beyond the threshold
    queued = sorted(p.name for p in (tmp_path / "to_label").glob("*.png"))
    assert 1 <= len(queued) <= config.to_label_max
    assert predictor.unsure == sum(bool(r["unsure"]) for r in [before, *records])


def test_energy_threshold_and_mqtt_copy(tmp_path: Path) -> None:
    config = PredictionsConfig(output="-", unsure_score="energy", mqtt=True)
    published: list[bytes] = []
    predictor = StreamPredictor("cam-2", SPEC, config, tmp_path, publish=published.append)
    served = nearest_mean([2, 5])
    labelled = np.stack([model_input(p, SPEC) for p in digit_pixels(2, 10) + digit_pixels(5, 10)])
    predictor.serve(served, labelled, np.array(["2"] * 10 + ["5"] * 10))
    _, _, energy = scores(served.logits(labelled))
    assert predictor.threshold == np.quantile(energy, 0.9)
    record = predictor.classify(frame(2, 60))
    assert json.loads(published[0]) == record


def test_the_to_label_queue_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    queue = LabelQueue(tmp_path / "q", limit=2)
    paths = [queue.put(digit_pixels(1, 1, start=i)[0], f"{i:03d}") for i in range(4)]
    assert len(queue) == 2
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["002.png", "003.png"]
    assert not paths[0].exists()
