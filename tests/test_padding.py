"""quantgate.padding: the one rule by which the server's batcher and the batch-consistency
gate stack requests of different lengths."""

import numpy as np

from quantgate.padding import right_pad


def request(ids, **more):
    ids = np.array([ids], np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), **more}


def test_rows_are_padded_after_their_tokens_with_each_inputs_pad_value():
    batch = right_pad([request([1, 2, 3]), request([4])], {"input_ids": 7, "attention_mask": 9})
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # 0, whatever pads say
    assert batch["input_ids"].dtype == np.int64


def test_a_part_of_several_rows_keeps_them_together():
    two = {"input_ids": np.array([[5, 6], [7, 8]]), "attention_mask": np.ones((2, 2), np.int64)}
    batch = right_pad([request([1, 2, 3]), two])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, 0], [7, 8, 0]]


def test_dims_after_the_sequence_are_kept():
    states = np.arange(6, dtype=np.float32).reshape(1, 3, 2)  # (rows, T, D)
    batch = right_pad(
        [request([1, 2, 3], states=states), request([4], states=states[:, :1] + 10)],
        {"states": -1.0},
    )
    assert batch["states"].shape == (2, 3, 2)
    assert batch["states"][1].tolist() == [[10.0, 11.0], [-1.0, -1.0], [-1.0, -1.0]]


def test_an_input_without_the_sequence_axis_is_stacked_as_it_is():
    """A per-row input (rows, 3) beside a 3-token request is no sequence: the 1-token
    request shows that it is not as long as the mask; nor is a (rows,) input."""
    batch = right_pad(
        [
            request([1, 2, 3], extra=np.array([[1.0, 2.0, 3.0]]), scale=np.array([0.5])),
            request([4], extra=np.array([[4.0, 5.0, 6.0]]), scale=np.array([2.0])),
        ]
    )
    assert batch["extra"].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert batch["scale"].tolist() == [0.5, 2.0] and batch["input_ids"].shape == (2, 3)


def test_the_caller_may_name_the_inputs_with_the_sequence_axis(monkeypatch):
    """The server's batcher knows every input of its model has the axis: named, the inputs
    are padded or stacked as named, without the guess from their shapes (which, on valid
    inputs, says the same: the guess is not made)."""
    import quantgate.padding

    def guessed(*args):
        raise AssertionError("the inputs were named: nothing to guess")

    monkeypatch.setattr(quantgate.padding, "_unpadded", guessed)
    parts = [
        request([1, 2], row=np.array([[0.5, 0.5, 0.5]])),
        request([3, 4, 5], row=np.ones((1, 3))),
    ]
    batch = right_pad(parts, {"input_ids": 9}, sequence=("input_ids", "attention_mask"))
    assert batch["input_ids"].tolist() == [[1, 2, 9], [3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["row"].tolist() == [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]  # not named: stacked


def test_without_a_mask_nothing_is_padded():
    parts = [{"x": np.ones((1, 4))}, {"x": np.zeros((2, 4))}]
    assert right_pad(parts)["x"].shape == (3, 4)


def test_which_models_are_padded_along_which_axis():
    """One rule for the server and the export's padding check: a mask, every input (batch,
    sequence) of one name, and no variable output axis but the batch and that sequence at 1."""
    from quantgate.padding import sequence_axis

    bert = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq")}
    assert sequence_axis(bert, [("batch", "seq", 384), ("batch", 384)]) == "seq"
    assert sequence_axis({"input_ids": ("batch", "seq")}, [("batch", 2)]) is None  # no mask
    assert sequence_axis({**bert, "pixels": ("batch", "seq", 3)}, [("batch", 2)]) is None
    assert sequence_axis({**bert, "input_ids": ("batch", "other")}, [("batch", 2)]) is None
    assert sequence_axis({**bert, "input_ids": ("batch", 64)}, [("batch", 2)]) is None
    assert sequence_axis(bert, [("batch", 384, "seq")]) is None  # not at axis 1
    assert sequence_axis(bert, [("batch", "seq", "labels")]) is None  # another variable axis
