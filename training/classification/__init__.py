"""Image classification: the classifier's config, datasets, transforms, trainer, evaluation and
extension (``defectscope train|evaluate|extend`` of a classifier run).

``training.classification.task``: the kind's ``Task`` (config type, data, model, the engine's
step and eval hooks), as ``training.detection.task`` is the detector's.
"""
