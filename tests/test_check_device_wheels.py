"""The device wheel check: what it calls a CUDA package, and which pins a target gets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).parent.parent / "scripts" / "check_device_wheels.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_device_wheels", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cuda_runtimes_are_flagged_and_cpu_packages_are_not() -> None:
    check = _script()
    resolved = ["torch", "nvidia-cudnn-cu13", "nvidia_nccl_cu12", "triton", "numpy", "Jinja2"]
    assert check.cuda_packages(resolved) == ["nvidia-cudnn-cu13", "nvidia-nccl-cu12", "triton"]
    assert check.cuda_packages(["onnxruntime", "sympy", "networkx"]) == []


def test_python_310_gets_its_own_pins_and_311_the_current_ones() -> None:
    check = _script()
    pins_311 = {pin.name: str(pin.specifier) for pin in check.pins_for("3.11")}
    pins_310 = {pin.name: str(pin.specifier) for pin in check.pins_for("3.10")}
    assert pins_311["numpy"] == "==2.4.6"
    assert pins_310["numpy"] == "==2.2.6"
    assert pins_310["typing-extensions"] == "==4.16.0"
    assert "typing-extensions" not in pins_311
    assert len(pins_310) == len(check.pins_for("3.10"))  # one pin per package per target
