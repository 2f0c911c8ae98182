"""Image features: the CNN zoo (``cnn``), the one featurisation path (``featuriser``), the ``vsa embed``
pipeline (``embed``) and the features file / search index (``store``)."""
