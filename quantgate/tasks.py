"""The tasks quantgate knows a model by, in one place: what its outputs mean, and so which
gates judge it (plain strings; the names Hugging Face's pipelines and Optimum use).

- ``sequence-classification``: one row of class scores per input row (``logits``), gated on
  accuracy with labels, else on agreement with FP32;
- ``multi-label-classification``: one row of per-label scores (``logits``, each label on
  where its score is above 0: a sigmoid's), gated on agreement with FP32's decisions;
- ``token-classification``: a row of class scores per token, labels per token;
- ``question-answering``: extractive, a question and its context read as a pair: a score
  per token for the answer's start and one for its end (``start_logits``, ``end_logits``),
  gated on agreement with FP32's answer span;
- ``feature-extraction``: an embedding, gated on its cosine to FP32 and its neighbours;
- ``custom``: a model of your own that is none of these: each output against FP32's.
"""

from __future__ import annotations

SEQUENCE_CLASSIFICATION = "sequence-classification"
# A Hugging Face ...ForSequenceClassification whose config's problem_type says so; quantgate's
# name (Hugging Face's pipelines call it text-classification, with a sigmoid)
MULTI_LABEL_CLASSIFICATION = "multi-label-classification"
TOKEN_CLASSIFICATION = "token-classification"  # a class per token: tagging, NER
QUESTION_ANSWERING = "question-answering"  # extractive: an answer span in the context
FEATURE_EXTRACTION = "feature-extraction"
CUSTOM = "custom"  # a factory model that is none of them: per-output gates only

CLASSIFIER_TASKS = (SEQUENCE_CLASSIFICATION,)  # one class per row: softmax scores, labels
MULTI_LABEL_TASKS = (MULTI_LABEL_CLASSIFICATION,)  # labels on or off: gated against FP32
TOKEN_TASKS = (TOKEN_CLASSIFICATION,)  # labels per token: (rows, sequence) arrays only
EMBEDDING_TASKS = (FEATURE_EXTRACTION,)  # gated on agreement with FP32, not on labels
QA_TASKS = (QUESTION_ANSWERING,)  # (batch, sequence) start and end scores: gated against FP32
QA_OUTPUTS = ("start_logits", "end_logits")  # its outputs, Hugging Face's names: the span's ends


def token_scores(names) -> tuple[str, ...]:
    """Of output ``names``, the (batch, sequence) ones that score each token: a question
    answerer's start and end scores, both by Hugging Face's names (an output of two dims is
    otherwise a row's values, not its tokens')."""
    return QA_OUTPUTS if set(QA_OUTPUTS) <= set(names) else ()


# A Hugging Face model is one of these; a factory's model may also be custom (or any other).
HF_TASKS = (
    SEQUENCE_CLASSIFICATION, MULTI_LABEL_CLASSIFICATION, TOKEN_CLASSIFICATION,
    QUESTION_ANSWERING, FEATURE_EXTRACTION,
)  # fmt: skip
