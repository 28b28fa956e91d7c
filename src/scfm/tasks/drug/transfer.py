"""Drug sensitivity from bulk cell lines to single cells (SCAD-style adversarial domain adaptation).

Labels: for each drug, a cell line is *sensitive* when its ln IC50 is at or below the drug's
``sensitive_quantile`` (default 0.5, the median) over the labelled lines, else *resistant*. GDSC's own
per-drug thresholds are not in the offline data, so the rule is a plain, documented quantile.

Features: the same representation for both domains (``scfm``: ``obsm['X_scfm']``, bulk lines embedded with
``--input-type bulk`` and cells with the single-cell path; ``expression``: ``X`` on the genes both share). Each
domain is standardised on its own mean and standard deviation first, which removes per-feature offsets and
scales between bulk and single cells before the adversary sees them.

Network per drug (after SCAD): extractor ``Linear h -> BatchNorm -> ReLU -> Dropout``; predictor ``Linear z ->
BatchNorm -> ReLU -> Dropout -> Linear z -> LeakyReLU -> Dropout -> Linear 1``; domain classifier behind a
gradient-reversal layer ``Linear h -> LeakyReLU -> Dropout -> Linear h -> LeakyReLU -> Linear 1``. Loss = BCE of
the drug label on bulk lines (class-balanced batches) + ``lambda`` x BCE of the domain on bulk and cell batches;
the reversed gradient pushes the extractor towards features the domain classifier cannot tell apart. Adam
(SCAD uses Adagrad), fixed epochs (the target has no labels to stop on). 20 % of the lines (stratified) are held out and scored:
``source_val_auroc``. ``domain_auroc`` says how well a fresh classifier still separates the domains after
training (0.5 = indistinguishable).

A cell's score ``obs['scfm_<drug>_sensitivity']`` is the predicted probability that it is sensitive.
No labelled single-cell drug-response data set is available offline; the method is tested on synthetic data
with a planted sensitivity program (tests/downstream/test_drug_transfer.py).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from scfm.errors import ScfmError
from scfm.tasks.drug.modeldir import read_model_dir, write_model_dir

MODEL_KIND = "scfm-drug-sensitivity"


@dataclass
class TransferSettings:
    hidden_dim: int = 256
    z_dim: int = 128
    dropout: float = 0.3
    domain_weight: float = 1.0  # lambda
    epochs: int = 30
    batch_size: int = 32  # per domain
    steps_per_epoch: int = 50
    learning_rate: float = 1e-3
    sensitive_quantile: float = 0.5
    val_fraction: float = 0.2
    seed: int = 0


def obs_key(drug: str) -> str:
    return f"scfm_{re.sub(r'[^A-Za-z0-9._-]+', '_', drug)}_sensitivity"


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class SensitivityNet(nn.Module):
    def __init__(self, dim: int, settings: TransferSettings):
        super().__init__()
        h, z, p = settings.hidden_dim, settings.z_dim, settings.dropout
        self.extractor = nn.Sequential(nn.Linear(dim, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(p))
        self.predictor = nn.Sequential(nn.Linear(h, z), nn.BatchNorm1d(z), nn.ReLU(), nn.Dropout(p),
                                       nn.Linear(z, z), nn.LeakyReLU(), nn.Dropout(p), nn.Linear(z, 1))
        self.domain = nn.Sequential(nn.Linear(h, h), nn.LeakyReLU(), nn.Dropout(p), nn.Linear(h, h), nn.LeakyReLU(),
                                    nn.Linear(h, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sensitivity logit, domain logit) of each row."""
        features = self.extractor(x)
        return self.predictor(features).squeeze(1), self.domain(_ReverseGradient.apply(features)).squeeze(1)

    def sensitivity(self, x: np.ndarray) -> np.ndarray:
        self.eval()
        with torch.no_grad():
            return torch.sigmoid(self.predictor(self.extractor(torch.from_numpy(x)))).numpy()


def standardise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = values.mean(axis=0), values.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def sensitivity_labels(ln_ic50: pd.Series, quantile: float) -> tuple[np.ndarray, float]:
    """1 = sensitive (ln IC50 <= the drug's quantile), 0 = resistant; and the threshold used."""
    threshold = float(np.quantile(ln_ic50.to_numpy(dtype=float), quantile))
    return (ln_ic50.to_numpy(dtype=float) <= threshold).astype(np.float32), threshold


def _stratified_holdout(labels: np.ndarray, fraction: float, rng) -> np.ndarray:
    held = np.zeros(len(labels), dtype=bool)
    for value in (0.0, 1.0):
        rows = np.flatnonzero(labels == value)
        held[rng.permutation(rows)[: int(round(fraction * len(rows)))]] = True
    return held


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def domain_separability(source: np.ndarray, target: np.ndarray, seed: int) -> float:
    """Cross-validated AUROC of a logistic regression telling the domains apart (0.5 = mixed)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    x = np.vstack([source, target])
    y = np.r_[np.zeros(len(source)), np.ones(len(target))]
    scores = cross_val_predict(LogisticRegression(max_iter=2000), x, y, cv=3, method="predict_proba")[:, 1]
    return _auroc(y, scores)


def train_sensitivity(source: np.ndarray, labels: np.ndarray, target: np.ndarray, settings: TransferSettings,
                      ) -> tuple[SensitivityNet, dict]:
    """One drug: standardised source rows with 0/1 labels, standardised target rows -> network and metrics."""
    from scfm.utils import one_torch_thread

    with one_torch_thread():
        return _train_sensitivity(source, labels, target, settings)


def _train_sensitivity(source, labels, target, settings: TransferSettings) -> tuple[SensitivityNet, dict]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    held = _stratified_holdout(labels, settings.val_fraction, rng)
    train_rows = np.flatnonzero(~held)
    if len(np.unique(labels[train_rows])) < 2:
        raise ScfmError("the training lines of a drug must include sensitive and resistant ones")
    # class-balanced draws: each class equally likely, as SCAD's weighted sampler does
    weights = np.where(labels[train_rows] == 1, 1 / labels[train_rows].sum(), 1 / (1 - labels[train_rows]).sum())
    weights = weights / weights.sum()
    net = SensitivityNet(source.shape[1], settings)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    bce = nn.functional.binary_cross_entropy_with_logits
    src_t, tgt_t, y_t = torch.from_numpy(source), torch.from_numpy(target), torch.from_numpy(labels)
    history = []
    b = settings.batch_size
    for epoch in range(settings.epochs):
        net.train()
        totals = np.zeros(2)
        for _ in range(settings.steps_per_epoch):
            s = torch.as_tensor(rng.choice(train_rows, size=b, p=weights))
            t = torch.as_tensor(rng.integers(0, len(target), size=b))
            label_logit, domain_src = net(src_t[s])
            _, domain_tgt = net(tgt_t[t])
            label_loss = bce(label_logit, y_t[s])
            domain_loss = bce(torch.cat([domain_src, domain_tgt]), torch.cat([torch.zeros(b), torch.ones(b)]))
            loss = label_loss + settings.domain_weight * domain_loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            totals += (label_loss.item(), domain_loss.item())
        history.append({"epoch": epoch + 1, "label_loss": totals[0] / settings.steps_per_epoch,
                        "domain_loss": totals[1] / settings.steps_per_epoch})
    net.eval()
    with torch.no_grad():
        src_features = net.extractor(src_t).numpy()
        tgt_features = net.extractor(tgt_t).numpy()
    metrics = {
        "n_lines": int(len(labels)), "n_sensitive": int(labels.sum()), "n_cells": int(len(target)),
        "source_val_auroc": _auroc(labels[held], net.sensitivity(source[held])),
        "domain_auroc": domain_separability(src_features, tgt_features, settings.seed),
        "history": history,
    }
    return net, metrics


@dataclass
class SensitivityModel:
    nets: dict[str, SensitivityNet]
    representation: str
    settings: TransferSettings
    thresholds: dict[str, float]
    target_mean: np.ndarray
    target_scale: np.ndarray
    genes: list[str] | None = None
    embed_settings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        drugs = list(self.nets)
        tensors = {f"drug{i}.{k}": v for i, drug in enumerate(drugs) for k, v in self.nets[drug].state_dict().items()}
        tensors["target_mean"] = torch.from_numpy(np.asarray(self.target_mean, dtype=np.float32))
        tensors["target_scale"] = torch.from_numpy(np.asarray(self.target_scale, dtype=np.float32))
        config = {"representation": self.representation, "dim": int(len(self.target_mean)), "drugs": drugs,
                  "thresholds": self.thresholds, "genes": self.genes, "embed_settings": self.embed_settings,
                  "settings": asdict(self.settings), **self.extra}
        write_model_dir(directory, MODEL_KIND, config, tensors)


def load_sensitivity_model(directory) -> SensitivityModel:
    config, tensors = read_model_dir(directory, MODEL_KIND, "drug sensitivity model", "scfm drug adapt")
    settings = TransferSettings(**config["settings"])
    nets = {}
    for i, drug in enumerate(config["drugs"]):
        net = SensitivityNet(config["dim"], settings)
        prefix = f"drug{i}."
        net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        nets[drug] = net.eval()
    known = {"kind", "scfm_version", "representation", "dim", "drugs", "thresholds", "genes", "embed_settings",
             "settings"}
    return SensitivityModel(nets, config["representation"], settings, config["thresholds"],
                            tensors["target_mean"].numpy(), tensors["target_scale"].numpy(), config.get("genes"),
                            config.get("embed_settings") or {}, {k: v for k, v in config.items() if k not in known})
