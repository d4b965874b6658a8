"""rtkit.eval: recognizer evaluation.

- ``roc``: ROC curves, AUC, TAR at FMR under the insightface (nearest ROC point) and
  bob.measure (threshold among the impostor scores) conventions, bob.measure's EER.
- ``verification``: insightface .bin benchmarks (LFW, CFP-FP, CPLFW, CALFW, AgeDB-30), the
  10-fold accuracy protocol, and ``build_bin`` for self-made benchmarks.
- ``pairs``: genuine/impostor pairs of an identity-folder tree in the .bin fold layout.
- ``ijbc``: IJB-C / IJB-B 1:1 template verification.
- ``embed``: ``Embedder``, any recognizer through the runtime's runners, with an embedding cache.
- ``results``: the result documents rt-eval writes and the report reads.
- ``report``: the Markdown/CSV tables and ROC figures built from result documents.

The math functions take embeddings or scores and return numbers, so they can be checked
against other implementations on the same inputs.
"""
