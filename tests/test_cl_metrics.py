"""Continual-learning metrics on hand-made accuracy matrices."""
import math

import pytest

from classp_fused.cl.metrics import (average_accuracy, backward_transfer, forgetting, mean_std,
                                     sequence_metrics)

# R[i][j]: accuracy on task j after training task i.
R3 = [[0.9, 0.1, 0.2],
      [0.7, 0.8, 0.1],
      [0.6, 0.5, 0.95]]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(R3) == pytest.approx((0.6 + 0.5 + 0.95) / 3)


def test_backward_transfer_compares_last_row_with_diagonal():
    # tasks 0 and 1: (0.6 - 0.9) and (0.5 - 0.8); the last task is not counted
    assert backward_transfer(R3) == pytest.approx(-0.3)


def test_forgetting_uses_best_accuracy_after_learning():
    # task 0 peaks later than right after learning it; pre-training accuracy is ignored
    r = [[0.5, 0.9, 0.0],
         [0.8, 0.7, 0.0],
         [0.4, 0.6, 0.9]]
    assert forgetting(r) == pytest.approx(((0.8 - 0.4) + (0.7 - 0.6)) / 2)
    assert backward_transfer(r) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.7)) / 2)


def test_forgetting_and_bwt_of_positive_transfer():
    r = [[0.5, 0.0],
         [0.7, 0.9]]
    assert backward_transfer(r) == pytest.approx(0.2)
    assert forgetting(r) == pytest.approx(-0.2)


def test_perfect_retention_has_no_forgetting():
    r = [[1.0, 0.1, 0.1], [1.0, 1.0, 0.2], [1.0, 1.0, 1.0]]
    assert sequence_metrics(r) == {"avg_acc": 1.0, "bwt": 0.0, "forgetting": 0.0,
                                   "own_acc": 1.0}


def test_own_task_accuracy_is_the_diagonal_mean():
    r = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.4, 0.6, 0.7]]
    assert sequence_metrics(r)["own_acc"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)


def test_single_task_has_undefined_transfer():
    assert average_accuracy([[0.75]]) == 0.75
    assert math.isnan(backward_transfer([[0.75]]))
    assert math.isnan(forgetting([[0.75]]))


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [0.1, 0.2], [[0.1], [0.2]]])
def test_non_square_matrix_is_rejected(bad):
    with pytest.raises(ValueError, match="square"):
        sequence_metrics(bad)


def test_mean_std_uses_sample_standard_deviation():
    mean, std = mean_std([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert std == pytest.approx(1.0)


def test_mean_std_of_one_seed_has_zero_spread():
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([[[0.5, 0.25]]]) == ([[0.5, 0.25]], [[0.0, 0.0]])


def test_mean_std_is_elementwise_over_matrices():
    mean, std = mean_std([[[0.0, 1.0]], [[1.0, 1.0]]])
    assert mean == [[0.5, 1.0]]
    assert std[0] == pytest.approx([math.sqrt(0.5), 0.0])
