"""The daemon: pipeline, batching, publisher, wire format, metrics, service surface, CLIs."""
