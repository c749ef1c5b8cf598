"""The models quantgate takes in.

transformer.py  the seed's encoder, written out against softmax(QK^T / sqrt(d_k)) V
data.py         the built-in task: scikit-learn's digits as 64 pixel tokens
train.py        training the built-in classifier, and its checkpoints
loaders.py      a MODEL spec (checkpoint, Hugging Face directory, package.module:factory)
                -> a module, its inputs and outputs, and real samples to validate on
huggingface.py  a Hugging Face directory's model, inputs and English text samples
factories.py    a package.module:factory (or a model object) checked and wrapped

The entry points, loaded on first use::

    from quantgate.model import TrainConfig, load_checkpoint, load_model
    from quantgate.model.train import train   # the function; quantgate.model.train is its module
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantgate._lazy import exports

_WHERE = {
    "ModelConfig": "transformer",
    "TrainConfig": "train",
    "load_checkpoint": "train",
    "load_digits_splits": "data",
    "load_model": "loaders",
}
__all__ = [
    "ModelConfig",
    "TrainConfig",
    "load_checkpoint",
    "load_digits_splits",
    "load_model",
]
__getattr__, __dir__ = exports(__name__, _WHERE)

if TYPE_CHECKING:
    from quantgate.model.data import load_digits_splits
    from quantgate.model.loaders import load_model
    from quantgate.model.train import TrainConfig, load_checkpoint
    from quantgate.model.transformer import ModelConfig
