"""Data-collection tools from the ACE paper (section 3): how image pairs and their
instructions are gathered at scale, for users who train ACE on their own images.

- ``features``: batch image features from any transformers image encoder (SigLIP by
  default), written as resumable safetensors shards with image ids (``store``: the
  shard format);
- ``pairing``: coarse k-means (faiss), then a two-turn union-find per cluster
  (``unionfind``: feature similarity, then a pluggable task-specific pair score from
  ``scorers``), cleaning filters, and LCU dataset output (``pair_manifest``, docs/DATA.md);
- ``instructions``: template instructions per task family and the text checks;
  ``rewriter``: LLM rewrites with de-duplication; ``captioner``: a pair-captioner
  interface for vision-language models (``local_models``: loading them offline);
- ``annotators``: Canny and soft edges, grayscale, depth and segmentation maps.

Command-line tools: ``scripts/collect_pairs.py``, ``scripts/write_instructions.py``,
``scripts/annotate.py``. See docs/COLLECT.md.
"""
