"""The tasks quantgate knows a model by, in one place: what its outputs mean, and so which
gates judge it (plain strings; the names Hugging Face's pipelines and Optimum use).

- ``sequence-classification``: one row of class scores per input row (``logits``), gated on
  accuracy with labels, else on agreement with FP32;
- ``token-classification``: a row of class scores per token, labels per token;
- ``feature-extraction``: an embedding, gated on its cosine to FP32 and its neighbours;
- ``custom``: a model of your own that is none of these: each output against FP32's.
"""

from __future__ import annotations

SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"  # a class per token: tagging, NER
FEATURE_EXTRACTION = "feature-extraction"
CUSTOM = "custom"  # a factory model that is none of them: per-output gates only

CLASSIFIER_TASKS = (SEQUENCE_CLASSIFICATION,)
TOKEN_TASKS = (TOKEN_CLASSIFICATION,)  # labels per token: (rows, sequence) arrays only
EMBEDDING_TASKS = (FEATURE_EXTRACTION,)  # gated on agreement with FP32, not on labels
# A Hugging Face model is one of these; a factory's model may also be custom (or any other).
HF_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION)
