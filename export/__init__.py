"""Deployable files from a trained FedFMX model: ONNX and TorchScript export, int8, parity
checks, and the ONNX Runtime session a device serves predictions from (see docs/export.md).

Modules: `checkpoint` (the safetensors checkpoint), `onnx_model`, `torchscript_model`,
`quantize`, `parity`, `pipeline` (export = write + check + rename), `inference`, `images`.
"""
