"""Floor 7 — ``blindspots audit``: a vendor's ONNX file audited as it would ship."""
