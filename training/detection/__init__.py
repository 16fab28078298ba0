"""Faster R-CNN defect detection: datasets, box-aware augmentation, model builder, synthetic benchmark data.

- ``training.detection.datasets``: ``DetectionSpec``, ``resolve_detection(spec) -> DetSplits``
  (COCO JSON, Pascal VOC XML folders such as NEU-DET / GC10-DET, YOLO txt; bad annotations
  reported by file and annotation id, skipped and counted, fatal with ``strict``).
- ``training.detection.loader``: ``DetectionDataset`` (torchvision-style targets with
  ``tv_tensors.BoundingBoxes``), ``collate``.
- ``training.detection.transforms``: ``AugmentSpec``, ``train_transform``, ``eval_transform``.
- ``training.detection.model``: ``DetectorSpec``, ``build_detector``, ``BoxPredictor.grow_classes``.
- ``training.detection.synth``: ``python -m training.detection.synth --out DIR`` (defects
  synthesised with exact boxes on real ELPV cells, COCO JSON).
- ``training.detection.coco_eval``: COCO mAP via pycocotools and the part-level verdict metrics.
"""
