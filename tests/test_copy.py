"""Python side of the byte engine: box construction and in-place (ordered) relayout on both code paths."""
import pytest
import torch

from amoeba_core.execution.copy import copy_boxes, copy_boxes_ordered, expand_runs, make_boxes, row_major_boxes


def compaction_boxes(rows, old_len, new_len, keep):
    """Boxes that move columns keep=[(old_start, new_start, length)] of a (rows, old_len) byte matrix to a
    (rows, new_len) layout at the front of the same buffer."""
    return row_major_boxes([k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep], rows, old_len, new_len)


@pytest.mark.parametrize("staged", [False, True])
def test_in_place_compaction_matches_out_of_place(staged):
    rows, old_len, new_len = 37, 50, 21
    keep = [(3, 0, 7), (20, 7, 9), (45, 16, 5)]
    buf = torch.randint(0, 256, (rows * old_len,), dtype=torch.uint8)
    want = buf.view(rows, old_len)
    want = torch.cat([want[:, 3:10], want[:, 20:29], want[:, 45:50]], dim=1).reshape(-1)
    scratch = torch.empty(64, dtype=torch.uint8)  # smaller than the data: the staged path works in batches
    copy_boxes_ordered(buf, compaction_boxes(rows, old_len, new_len, keep), scratch, staged=staged)
    assert torch.equal(buf[:rows * new_len], want)


def test_staged_relayout_splits_runs_longer_than_scratch():
    buf = torch.arange(256, dtype=torch.int32).view(torch.uint8).clone()
    want = buf[100:1000].clone()
    copy_boxes_ordered(buf, make_boxes([100], [0], [900]), torch.empty(64, dtype=torch.uint8), staged=True)
    assert torch.equal(buf[:900], want)


def test_copy_boxes_between_dtypes_works_on_bytes():
    src = torch.arange(12, dtype=torch.float32).view(3, 4)
    dst = torch.zeros(3, 2, dtype=torch.float32)
    copy_boxes(dst, src, make_boxes(4, 0, 8, 3, 16, 8))  # columns 1..2 of every row
    assert torch.equal(dst, src[:, 1:3])


def test_expand_runs_orders_level0_fastest():
    boxes = make_boxes(0, 100, 2, 3, 10, 2)
    boxes[0, 6:9] = [2, 1000, 6]  # level 1: 2 repetitions
    runs = expand_runs(boxes)
    assert runs[:, 0].tolist() == [0, 10, 20, 1000, 1010, 1020]
    assert runs[:, 1].tolist() == [100, 102, 104, 106, 108, 110]


def test_invalid_boxes_raise_before_copying():
    src, dst = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reaches src byte 20 of 16"):
        copy_boxes(dst, src, make_boxes(10, 0, 10))
    assert dst.eq(1).all()
