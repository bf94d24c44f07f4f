"""ONNX graphs built from the canonical checkpoint (see docs/onnx-graphs.md).

Submodules import the `onnx` package; this one does not, so callers can check for it first.
"""

DECODER, PREGATE, ROUTES, MANIFEST = "decoder.onnx", "pregate.onnx", "routes.safetensors", "manifest.json"
