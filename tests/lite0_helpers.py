"""Whether the EfficientNet-Lite0 weights package is installed: tests on the real trunk skip
cleanly without it."""

from __future__ import annotations

import pytest

from fedfmx.errors import ConfigError
from fedfmx.trunk.pretrained import weights_path

try:
    weights_path()
    HAVE_WEIGHTS = True
except ConfigError:  # the weights package is not installed
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="EfficientNet-Lite0 not installed")
