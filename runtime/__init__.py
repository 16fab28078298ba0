"""Device-side runtime: bundle format, preprocessing, backends, the serving daemon.

Imports only numpy, OpenCV, ONNX Runtime, pyzmq, prometheus-client and rich
(TensorRT + pycuda lazily): never torch, torchvision, training or calibration.
"""
