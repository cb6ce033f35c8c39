import math

import torch

from segtrain.metrics import ConfusionMatrix


def test_counts_and_scores_by_hand():
    confusion = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 0]])
    confusion.update(prediction, target)
    assert confusion.matrix.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    result = confusion.compute()
    # IoU: class 0: 2/(3+3-2)=0.5, class 1: 2/(2+3-2)=2/3, class 2: 2/(3+2-2)=2/3
    assert result["IoU"] == [0.5, 2 / 3, 2 / 3]
    assert math.isclose(result["mIoU"], (0.5 + 2 / 3 + 2 / 3) / 3)
    assert math.isclose(result["acc"], 6 / 8)
    assert math.isclose(result["Dice"][0], 2 * 2 / (3 + 3))


def test_accumulates_over_batches_not_averaging_batch_scores():
    whole, batched = ConfusionMatrix(2), ConfusionMatrix(2)
    target = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1])
    prediction = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
    whole.update(prediction, target)
    batched.update(prediction[:3], target[:3])
    batched.update(prediction[3:], target[3:])
    assert whole.compute() == batched.compute()


def test_ignore_index_is_left_out():
    confusion = ConfusionMatrix(2, ignore_index=255)
    confusion.update(torch.tensor([1, 1, 0]), torch.tensor([1, 255, 0]))
    assert confusion.matrix.sum() == 2
    assert confusion.compute()["mIoU"] == 1.0


def test_class_absent_everywhere_is_left_out_of_the_mean():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    result = confusion.compute()
    assert math.isnan(result["IoU"][2])
    assert math.isclose(result["mIoU"], (0.5 + 0.5) / 2)


def test_class_missed_entirely_counts_as_zero():
    confusion = ConfusionMatrix(2)
    confusion.update(torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert confusion.compute()["IoU"] == [0.5, 0.0]
