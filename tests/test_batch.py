"""Samples counted for the batches people use (wattlog.batch.count_samples)."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from wattlog.batch import count_samples


class Arr:
    def __init__(self, *shape):
        self.shape = shape


@dataclasses.dataclass
class DataclassBatch:
    ids: Arr
    label: int = 0


class BatchEncodingLike(collections.UserDict):  # transformers.BatchEncoding is a UserDict
    pass


class Custom:
    def __init__(self):
        self.meta = "x"
        self.input_ids = Arr(12, 64)


@pytest.mark.parametrize(
    ("batch", "n"),
    [
        (Arr(8, 3), 8),
        ((Arr(4, 2), Arr(4)), 4),
        ([{"x": Arr(5, 2)}, Arr(5)], 5),
        ({"input_ids": Arr(16, 128), "attention_mask": Arr(16, 128)}, 16),
        (BatchEncodingLike(input_ids=Arr(7, 32)), 7),
        (DataclassBatch(Arr(3, 9)), 3),
        (Custom(), 12),
        ({"nested": {"deeper": [Arr(2, 2)]}}, 2),
        ("text", 0),
        (None, 0),
        (Arr(), 0),  # a scalar has no leading dimension
    ],
)
def test_count_samples(batch, n):
    assert count_samples(batch) == n


def test_real_tensors_and_batch_encoding():
    torch = pytest.importorskip("torch")
    assert count_samples({"pixel_values": torch.zeros(6, 3, 8, 8)}) == 6
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.zeros(9, 4, dtype=torch.long)})
    assert count_samples(enc) == 9


def test_sample_counter_agrees_with_the_walk_and_walks_again_when_a_batch_is_shaped_otherwise() -> None:
    import pickle

    from wattlog.batch import SampleCounter

    @dataclasses.dataclass
    class Batch:
        meta: object
        x: object


    counter = SampleCounter()
    batches = [(Arr(3, 2),), {"a": None, "b": Arr(5)}, [[Arr(2, 1)]], Batch(None, Arr(7, 1)),
               {"ids": [1, 2]}, Arr(), (Arr(4),), {"a": Arr(6)}]
    for batch in batches + batches:  # the second pass reads the remembered places
        assert counter(batch) == count_samples(batch), batch
    assert counter({"a": None, "b": Arr(9)}) == 9  # the remembered key "a" holds nothing now: walk
    assert counter(({"x": Arr(2)},)) == 2  # a tuple shaped otherwise than (array,)
    assert counter((Arr(4),)) == 4
    assert pickle.loads(pickle.dumps(counter))((Arr(5),)) == 5  # pickles (ddp_spawn) without its memo
