"""Image-sentence alignment: the model (``model``), its training (``train``) and retrieval evaluation
(``evaluate``), GloVe word vectors (``glove``), the chain MRF (``mrf``) and ``vsa align``'s snippets (``snippets``)."""
