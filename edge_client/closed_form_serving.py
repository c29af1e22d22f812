"""Predictions of a torch-free closed-form training device: the current head on the same `φ`.

A closed-form head is linear in the fixed features, `logits = φ(x)·Wᵀ`
(`fedfmx.learner.model.LinearHead`), and a device without torch already computes `φ` to train
(its ONNX trunk, int8 or fp32, then the fixed maps in numpy: `edge_client.statistics_learner`). So
serving exports nothing: each verified version's head rows are taken as they are and frames go
through the learner's own `features` — no torch, no second trunk session, and no parity check
against another graph, since the served function is the one the fleet's head was solved on.
"""

from __future__ import annotations

import logging

import numpy as np

from edge_client.predictions import Served
from edge_client.statistics_learner import StatisticsLearner
from fedfmx.errors import FedFMXError
from fedfmx.federation.aggregation import HEAD_WEIGHT, Arrays
from fedfmx.wire.messages import ModelHeader

log = logging.getLogger(__name__)


class ClosedFormServer:
    """The newest verified version's head over the learner's features (`DeviceModelServer`'s
    interface, as the agent uses it)."""

    def __init__(self, learner: StatisticsLearner) -> None:
        self.learner = learner
        self.current: Served | None = None

    def refresh(
        self, header: ModelHeader, weights: Arrays, images: np.ndarray, names: np.ndarray
    ) -> Served | None:
        """Serve `header`'s version (None: already serving it, or no classes yet); the local
        rows are not needed (nothing is converted, so nothing is checked)."""
        del images, names
        if not header.class_names or (self.current and self.current.version == header.version):
            return None
        head = np.ascontiguousarray(weights[HEAD_WEIGHT][: len(header.class_names)], np.float32)
        features = self.learner.features

        def logits(frames: np.ndarray) -> np.ndarray:
            return features(frames) @ head.T

        self.current = Served(header.version, logits, list(header.class_names))
        log.info("serving closed-form head version %s without torch", header.version)
        return self.current

    def served(self) -> Served:
        """The serving version as the stream predictor uses it (logits, class names)."""
        if self.current is None:
            raise FedFMXError("no model version is serving yet")
        return self.current
