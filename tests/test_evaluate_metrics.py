"""The evaluation metrics against hand computations and NumPy: ECE, accuracy/top-5, NLL, the
per-class CSV, FLOPs of a known layer, the deployed parameter count (SimKD's projector and head
included)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from asib_core.models import count_parameters
from asib_core.pipeline.evaluate import classification_metrics, expected_calibration_error, flops_per_image, per_class_table


def test_ece_of_a_hand_made_example():
    # confidences 0.91 (right) and 0.92 (wrong) share a bin; 0.62 (wrong), 0.70 (right) have their own
    probs = torch.tensor([[0.91, 0.09], [0.92, 0.08], [0.62, 0.38], [0.30, 0.70]])
    labels = torch.tensor([0, 1, 1, 1])
    expected = 2 / 4 * abs(0.5 - 0.915) + 1 / 4 * abs(0 - 0.62) + 1 / 4 * abs(1 - 0.70)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)  # 0.4375
    assert expected == pytest.approx(0.4375)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0


def test_acc_top5_nll_against_numpy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 10, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (200,), generator=g)
    out = classification_metrics(logits, labels, 10)
    z, y = logits.numpy(), labels.numpy()
    ranks = np.argsort(-z, axis=1)
    log_norm = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert out["acc"] == pytest.approx(np.mean(ranks[:, 0] == y))
    assert out["top5"] == pytest.approx(np.mean([y[i] in ranks[i, :5] for i in range(len(y))]))
    assert out["nll"] == pytest.approx(np.mean(log_norm - z[np.arange(len(y)), y]))
    assert 0.05 < out["acc"] < out["top5"] < 1  # a mix of hits and misses: the checks can tell


def test_per_class_csv():
    logits = torch.eye(3)[[0, 1, 1, 2, 2, 0]]   # predictions 0 1 1 2 2 0
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    csv = per_class_table(logits, labels, ["zero", "one", "two", "four"]).to_csv(index=False)
    table = pd.read_csv(io.StringIO(csv))
    assert list(table.columns) == ["class_index", "class_name", "count", "accuracy"]
    assert table["class_name"].tolist() == ["zero", "one", "two", "four"]
    assert table["count"].tolist() == [2, 1, 3, 0]
    assert table["accuracy"].tolist()[:3] == pytest.approx([0.5, 1.0, 2 / 3])
    assert np.isnan(table["accuracy"][3])


def test_flops_of_a_known_layer():
    layer = torch.nn.Linear(3072, 10)
    assert flops_per_image(lambda x: layer(x.flatten(1)), torch.device("cpu")) == 61_440  # 2 * 3072 * 10


def test_deployed_parameters_include_simkd_projector_and_head():
    from asib_core.methods import build_distiller
    from asib_core.models import create_model
    from test_methods_crd_reviewkd_simkd_sskd import method_cfg

    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=10), create_model("resnet20", num_classes=10)
    n_student = sum(p.numel() for p in student.parameters())
    simkd = build_distiller(method_cfg("simkd"), student, [teacher])
    cs, h, ct = simkd.projector.in_channels, simkd.projector.hidden, simkd.projector.out_channels
    # 1x1 conv, BN, 3x3 conv, BN, 1x1 conv, BN (no conv bias); the copied teacher classifier
    projector = cs * h + 2 * h + 9 * h * h + 2 * h + h * ct + 2 * ct
    assert count_parameters(simkd.deployed_model()) == n_student + projector + ct * 10 + 10
    kd = build_distiller(method_cfg("crd"), create_model("resnet8", num_classes=10), [teacher])
    assert count_parameters(kd.deployed_model()) == n_student  # CRD's embeddings are not deployed
