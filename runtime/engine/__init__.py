"""TensorRT engines built on the station: build, metadata, accuracy gate (TensorRT imported lazily)."""
