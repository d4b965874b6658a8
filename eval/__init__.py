"""rtkit.eval: recognizer evaluation.

- ``roc``: ROC curves, AUC, TAR at FMR under the insightface and "FMR <= target" conventions.
- ``verification``: insightface .bin benchmarks (LFW, CFP-FP, CPLFW, CALFW, AgeDB-30), the
  10-fold accuracy protocol, and ``build_bin`` for self-made benchmarks.
- ``ijbc``: IJB-C / IJB-B 1:1 template verification.
- ``embed``: ``Embedder``, any recognizer through the runtime's runners, with an embedding cache.
- ``report``: result files and the Markdown/CSV tables and ROC figures built from them.

The math functions take embeddings or scores and return numbers, so they can be checked
against other implementations on the same inputs.
"""
