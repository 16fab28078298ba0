"""API READY: DefectScope training side — backbones, data splits, fine-tuning, checkpoints.

Public entry points (docs/contracts.md):
- ``training.backbones``: ``REGISTRY`` (name -> BackboneSpec), ``build_model(name, num_classes,
  weights="imagenet"|"none"|path, input_spec=None)`` -> ``Classifier`` (``body`` + ``head``,
  ordered ``groups`` stem -> stages -> head, ``set_trainable(n)``, ``forward_features``),
  ``sized_input(spec, image_size, crop_fraction=...)``. ``tiny_cnn`` is the fast test
  backbone (use ``weights="none"``).
- ``training.classification.data``: ``DataSpec``, ``resolve_splits(spec_or_dict) -> Splits`` (``train``,
  ``val``, ``test`` lists of ``Sample(path, label, group)``, ``classes``, ``good_classes``,
  ``skipped``, ``fingerprint``); ``training.data``: what both tasks' readers share (``DataError``,
  ``IMAGE_EXTENSIONS``, ``load_rgb``, ``cache_dir``).
- ``training.classification.task`` / ``training.detection.task``: ``TASK``, each kind's
  ``training.engine.TaskKind`` (config, data, model, the engine's step and eval hooks, commands).
- ``training.checkpoint``: ``load_model(path) -> (model, ModelCard)``, ``save_model``,
  ``read_card``, ``ModelCard``, atomic writers, resume state (``last.pt``).
- ``training.classification.transforms``: ``val_transform(input_spec)`` (the contract's reference transform),
  ``train_pipeline``.
- ``training.classification.trainer``: ``train(TrainConfig)``; ``training.classification.config``: ``TrainConfig``,
  ``load_config``; ``training.classification.evaluate``: ``evaluate_samples`` (TTA views from ``runtime.inference.tta``).
- ``training.engine``: ``Engine`` (the one epoch loop and ``predict``), ``EpochSelector``, ``fit_epochs``, ``TaskKind``.
- ``training.classification.cli``: ``train_main`` (``defectscope train``); ``training.classification.evaluate_cli``: ``evaluate_main``
  (``defectscope evaluate``);
  ``training.classification.extend_cli``: ``main`` (``defectscope extend``).
"""
