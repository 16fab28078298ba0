"""Camera sources: OpenCV and GStreamer readers, capture threads, the frame hub."""
