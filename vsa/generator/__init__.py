"""The caption generator: models (one registered file each, ``models/``), their config and loading (``model``),
decoding, training, metrics, evaluation on a split and ``vsa caption`` (``captioner``)."""
