"""The models quantgate takes in.

transformer.py  the seed's encoder, written out against softmax(QK^T / sqrt(d_k)) V
data.py         the built-in task: scikit-learn's digits as 64 pixel tokens
train.py        training the built-in classifier, and its checkpoints
loaders.py      a MODEL spec (checkpoint, Hugging Face directory, package.module:factory)
                -> a module, its inputs and outputs, and real samples to validate on
"""
