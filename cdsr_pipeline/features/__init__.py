"""Frozen item features: encoders, item images, embedding tables (no Dagster here).

- :mod:`.encoders`: :class:`~.encoders.EncoderSpec`, :func:`~.encoders.load_text_encoder`,
  :func:`~.encoders.load_image_encoder` (open_clip, sentence-transformers).
- :mod:`.images`: :class:`~.images.ImageFetcher`, fetching and checking item images.
- :mod:`.embeddings`: :func:`~.embeddings.encode_item_texts`,
  :func:`~.embeddings.encode_item_images`, :func:`~.embeddings.encode_texts_by_item`,
  incremental through :class:`~.embeddings.EmbeddingCache`.

Submodules are imported directly, so that fetching images does not import torch.
"""
