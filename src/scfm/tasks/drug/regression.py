"""ln IC50 regression from a cell representation and a drug fingerprint (DeepCDR-style, both branches MLPs).

Architecture (``DrugResponseNet``), after DeepCDR's expression branch and fusion head:

    cell  (d)      -> Linear 256 -> tanh -> BatchNorm -> Dropout 0.1 -> Linear 100 -> ReLU
    drug  (bits)   -> Linear 256 -> ReLU -> BatchNorm -> Dropout 0.1 -> Linear 100 -> ReLU
    concat (200)   -> Linear 300 -> tanh -> Dropout 0.1 -> Linear 100 -> ReLU -> Dropout 0.2 -> Linear 1

DeepCDR's drug branch is a graph convolution network over atoms and its head ends in 1-D convolutions; here
the drug is a Morgan fingerprint (see ``fingerprints.py``) and the head is dense. Cell features are
standardised with the training cell lines' mean and standard deviation (PCA, when chosen, is fitted on the
training lines too). Training: MSE on ln IC50, Adam (lr 1e-3), batches of 256 pairs, at most 100 epochs, and
early stopping on the validation Pearson correlation (patience 10, the best epoch's weights are kept), as
DeepCDR does. Validation and test sets are split by the same unit as asked (``cell_line``: unseen lines;
``drug``: unseen drugs; ``pair``: random pairs), with one seed.

Every metric set is paired with a drug-mean baseline (each drug's training mean; the overall training mean for
a drug not seen in training): on GDSC most of the overall Pearson correlation comes from which drug it is.

    assign_split(pairs, by, test_fraction, val_fraction, seed) -> array of "train" | "val" | "test"
    fit_drug_model(cells, pairs, fingerprints, split, *, representation, ...) -> (DrugModel, predictions, history)
    regression_metrics(observed, predicted, drugs) -> dict
    DrugModel.save(dir) / load_drug_model(dir) / DrugModel.predict(cells, drugs, fingerprints)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from scfm.errors import ScfmError
from scfm.tasks.drug.data import CellTable, reorder_genes
from scfm.tasks.drug.fingerprints import Fingerprints
from scfm.tasks.drug.modeldir import read_model_dir, write_model_dir
from scfm.utils import one_torch_thread

SPLIT_UNITS = ("cell_line", "drug", "pair")
MODEL_KIND = "scfm-drug-regressor"
MIN_PAIRS_PER_DRUG = 10  # a per-drug correlation on fewer pairs says little


@dataclass
class RegressorSettings:
    hidden_dim: int = 256
    branch_dim: int = 100
    fusion_dim: int = 300
    dropout: float = 0.1
    max_epochs: int = 100
    patience: int = 10
    batch_size: int = 256
    learning_rate: float = 1e-3
    pca_components: int = 100
    seed: int = 0


class DrugResponseNet(nn.Module):
    def __init__(self, cell_dim: int, drug_dim: int, settings: RegressorSettings):
        super().__init__()
        h, b, f, p = settings.hidden_dim, settings.branch_dim, settings.fusion_dim, settings.dropout
        self.cell = nn.Sequential(nn.Linear(cell_dim, h), nn.Tanh(), nn.BatchNorm1d(h), nn.Dropout(p),
                                  nn.Linear(h, b), nn.ReLU())
        self.drug = nn.Sequential(nn.Linear(drug_dim, h), nn.ReLU(), nn.BatchNorm1d(h), nn.Dropout(p),
                                  nn.Linear(h, b), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * b, f), nn.Tanh(), nn.Dropout(p), nn.Linear(f, b), nn.ReLU(),
                                  nn.Dropout(2 * p), nn.Linear(b, 1))

    def forward(self, cells: torch.Tensor, cell_rows: torch.Tensor, drugs: torch.Tensor, drug_rows: torch.Tensor
                ) -> torch.Tensor:
        """ln IC50 of the pairs (``cells[cell_rows[i]]``, ``drugs[drug_rows[i]]``).

        Each branch runs once per distinct cell line / drug of the batch and the head once per pair: a batch of
        1,024 GDSC pairs holds ~600 distinct lines and fewer drugs, so the wide first layers cost far less.
        (BatchNorm statistics are then taken over the distinct lines and drugs of the batch.)
        """
        return self.head(torch.cat([_branch(self.cell, cells, cell_rows), _branch(self.drug, drugs, drug_rows)],
                                   dim=1)).squeeze(1)


def _branch(layers: nn.Module, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    distinct, position = torch.unique(rows, return_inverse=True)
    if layers.training and len(distinct) < 2:  # BatchNorm needs two rows to train on
        distinct, position = rows, torch.arange(len(rows))
    return layers(table[distinct])[position]


# ------------------------------------------------------------------------------------------ splits
def assign_split(pairs: pd.DataFrame, by: str, test_fraction: float, val_fraction: float, seed: int) -> np.ndarray:
    """Each pair's set; whole cell lines (or drugs) go to one set so that test units are unseen."""
    if by not in SPLIT_UNITS:
        raise ScfmError(f"unknown split unit {by!r} (choose from {', '.join(SPLIT_UNITS)})")
    if not (0 <= test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ScfmError(f"test ({test_fraction}) and validation ({val_fraction}) fractions must leave pairs "
                        "to train on")
    units = np.arange(len(pairs)) if by == "pair" else pairs[by].to_numpy()
    unique = np.unique(units)
    order = np.random.default_rng(seed).permutation(unique)
    n_test = int(round(test_fraction * len(unique)))
    n_val = max(1, int(round(val_fraction * len(unique))))
    if len(unique) - n_test - n_val < 1:
        raise ScfmError(f"only {len(unique)} {by.replace('_', ' ')}(s): too few to split into train, validation "
                        "and test")
    role = pd.Series("train", index=order, dtype=object)
    role.iloc[:n_test] = "test"
    role.iloc[n_test : n_test + n_val] = "val"
    return role.loc[units].to_numpy()


# ------------------------------------------------------------------------------------------ metrics
def _constant(values: np.ndarray) -> bool:
    return np.ptp(values) <= 1e-9 * (1.0 + np.abs(values).max())


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or _constant(a) or _constant(b):
        return float("nan")  # e.g. a drug-mean prediction within one drug
    return float(np.corrcoef(a, b)[0, 1])


def regression_metrics(observed, predicted, drugs) -> dict:
    """Overall Pearson / Spearman / RMSE, and the median over drugs of each drug's own Pearson."""
    from scipy.stats import spearmanr

    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    frame = pd.DataFrame({"o": observed, "p": predicted, "d": np.asarray(drugs)})
    per_drug = {d: _pearson(g["o"].to_numpy(), g["p"].to_numpy())
                for d, g in frame.groupby("d", sort=True) if len(g) >= MIN_PAIRS_PER_DRUG}
    scored = [v for v in per_drug.values() if np.isfinite(v)]
    return {
        "n_pairs": int(len(observed)),
        "pearson": _pearson(observed, predicted),
        "spearman": (float(spearmanr(observed, predicted).statistic)
                     if len(observed) > 1 and not _constant(observed) and not _constant(predicted) else float("nan")),
        "rmse": float(np.sqrt(np.mean((observed - predicted) ** 2))) if len(observed) else float("nan"),
        "per_drug_median_pearson": float(np.median(scored)) if scored else float("nan"),
        "n_drugs_scored": len(scored),
    }


def drug_mean_baseline(train: pd.DataFrame, target: pd.DataFrame) -> np.ndarray:
    means = train.groupby("drug")["ln_ic50"].mean()
    return target["drug"].map(means).fillna(train["ln_ic50"].mean()).to_numpy(dtype=float)


# ------------------------------------------------------------------------------------ the model
@dataclass
class DrugModel:
    net: DrugResponseNet
    representation: str
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    fingerprints: Fingerprints
    smiles: dict[str, str]
    settings: RegressorSettings
    genes: list[str] | None = None  # expression / pca
    pca_mean: np.ndarray | None = None
    pca_components: np.ndarray | None = None  # (k, genes)
    embed_settings: dict = field(default_factory=dict)
    fingerprint: dict = field(default_factory=dict)  # radius, n_bits
    extra: dict = field(default_factory=dict)  # training summary written into config.json

    def features(self, cells: CellTable, path=None) -> np.ndarray:
        """Cell representation -> the standardised features the network was trained on."""
        values = cells.values
        if self.representation in ("expression", "pca"):
            values = reorder_genes(cells, self.genes, path)
        if self.representation == "pca":
            values = (values - self.pca_mean) @ self.pca_components.T
        if values.shape[1] != len(self.feature_mean):
            raise ScfmError(f"the input has {values.shape[1]} features but the model was trained on "
                            f"{len(self.feature_mean)} ({self.representation})", path)
        return ((values - self.feature_mean) / self.feature_scale).astype(np.float32)

    def predict_pairs(self, features: np.ndarray, drug_bits: np.ndarray, cell_idx, drug_idx,
                      batch_size: int = 8192) -> np.ndarray:
        self.net.eval()
        cells_t, drugs_t = torch.from_numpy(features), torch.from_numpy(drug_bits)
        out = []
        with torch.no_grad():
            for start in range(0, len(cell_idx), batch_size):
                c = torch.as_tensor(cell_idx[start : start + batch_size])
                d = torch.as_tensor(drug_idx[start : start + batch_size])
                out.append(self.net(cells_t, c, drugs_t, d).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    # ------------------------------------------------------------------ directory format
    def save(self, directory: Path) -> None:
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors["feature_mean"] = torch.from_numpy(np.asarray(self.feature_mean, dtype=np.float32))
        tensors["feature_scale"] = torch.from_numpy(np.asarray(self.feature_scale, dtype=np.float32))
        tensors["drug_fingerprints"] = torch.from_numpy(np.asarray(self.fingerprints.bits, dtype=np.float32))
        if self.pca_components is not None:
            tensors["pca_mean"] = torch.from_numpy(np.asarray(self.pca_mean, dtype=np.float32))
            tensors["pca_components"] = torch.from_numpy(np.asarray(self.pca_components, dtype=np.float32))
        config = {
            "representation": self.representation, "cell_dim": int(self.net.cell[0].in_features),
            "drugs": self.fingerprints.drugs, "smiles": {d: self.smiles[d] for d in self.fingerprints.drugs},
            "fingerprint": self.fingerprint, "genes": self.genes, "embed_settings": self.embed_settings,
            "settings": asdict(self.settings), **self.extra,
        }
        write_model_dir(directory, MODEL_KIND, config, tensors)


def load_drug_model(directory) -> DrugModel:
    config, tensors = read_model_dir(directory, MODEL_KIND, "drug response model", "scfm drug train")
    settings = RegressorSettings(**config["settings"])
    bits = tensors["drug_fingerprints"].numpy()
    net = DrugResponseNet(config["cell_dim"], bits.shape[1], settings)
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    net.eval()
    fingerprints = Fingerprints(list(config["drugs"]), bits)
    pca = "pca_components" in tensors
    extra = {k: v for k, v in config.items() if k not in {"kind", "scfm_version", "representation", "cell_dim",
                                                            "drugs", "smiles", "fingerprint", "genes",
                                                            "embed_settings", "settings"}}
    return DrugModel(net, config["representation"], tensors["feature_mean"].numpy(),
                     tensors["feature_scale"].numpy(), fingerprints, dict(config["smiles"]), settings,
                     config.get("genes"), tensors["pca_mean"].numpy() if pca else None,
                     tensors["pca_components"].numpy() if pca else None, config.get("embed_settings") or {},
                     config.get("fingerprint") or {}, extra)


# ------------------------------------------------------------------------------------- training
def _fit_feature_transform(cells: CellTable, train_rows: np.ndarray, representation: str, settings: RegressorSettings):
    """PCA (if asked) and standardisation, both from the training cell lines only."""
    values = cells.values
    pca_mean = pca_components = None
    if representation == "pca":
        from sklearn.decomposition import PCA

        k = min(settings.pca_components, len(train_rows) - 1, values.shape[1])
        if k < 1:
            raise ScfmError("too few training cell lines for PCA")
        pca = PCA(n_components=k, random_state=settings.seed).fit(values[train_rows])
        pca_mean, pca_components = pca.mean_.astype(np.float32), pca.components_.astype(np.float32)
        values = (values - pca_mean) @ pca_components.T
    mean = values[train_rows].mean(axis=0)
    scale = values[train_rows].std(axis=0)
    scale[scale < 1e-6] = 1.0  # a constant feature stays constant (0) instead of exploding
    return mean.astype(np.float32), scale.astype(np.float32), pca_mean, pca_components


def fit_drug_model(cells: CellTable, pairs: pd.DataFrame, fingerprints: Fingerprints, split: np.ndarray, *,
                   representation: str, smiles: dict[str, str], settings: RegressorSettings,
                   fingerprint_params: dict | None = None, progress=None, log_epoch=None):
    """Train on ``split == "train"``, stop early on ``"val"``; returns (model, predictions of every pair, history).

    ``pairs``: ``cell_line``, ``drug``, ``ln_ic50`` — every cell line in ``cells.names``, every drug in
    ``fingerprints.drugs`` (see :func:`scfm.tasks.drug.data.overlapping_pairs`).
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    split = np.asarray(split)
    line_row = pd.Series(np.arange(len(cells.names)), index=cells.names)
    drug_row = pd.Series(np.arange(len(fingerprints.drugs)), index=fingerprints.drugs)
    cell_idx = line_row.loc[pairs["cell_line"]].to_numpy()
    drug_idx = drug_row.loc[pairs["drug"]].to_numpy()
    y = pairs["ln_ic50"].to_numpy(dtype=np.float32)
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    if len(train) == 0 or len(val) == 0:
        raise ScfmError("the split left no training or no validation pairs")

    mean, scale, pca_mean, pca_components = _fit_feature_transform(
        cells, np.unique(cell_idx[train]), representation, settings)
    model = DrugModel(DrugResponseNet(len(mean), fingerprints.bits.shape[1], settings), representation, mean, scale,
                      fingerprints, smiles, settings, cells.genes if representation != "scfm" else None, pca_mean,
                      pca_components, cells.embed_settings if representation == "scfm" else {},
                      dict(fingerprint_params or {}))
    features = model.features(cells)
    with one_torch_thread():
        history = _train_loop(model, features, fingerprints.bits, cell_idx, drug_idx, y, train, val, settings, rng,
                              progress, log_epoch)
    predicted = model.predict_pairs(features, fingerprints.bits, cell_idx, drug_idx)
    predictions = pairs.assign(split=split, predicted_ln_ic50=predicted,
                               drug_mean_baseline=drug_mean_baseline(pairs[split == "train"], pairs))
    return model, predictions, history


def _train_loop(model: DrugModel, features, drug_bits, cell_idx, drug_idx, y, train, val, settings, rng, progress,
                log_epoch) -> list[dict]:
    cells_t, drugs_t, y_t = torch.from_numpy(features), torch.from_numpy(drug_bits), torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.net.parameters(), lr=settings.learning_rate)
    best_score, best_state, best_epoch, waited, history = -np.inf, None, 0, 0, []
    for epoch in range(1, settings.max_epochs + 1):
        model.net.train()
        order = rng.permutation(train)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            batch = torch.as_tensor(order[start : start + settings.batch_size])
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            prediction = model.net(cells_t, torch.as_tensor(cell_idx[batch]), drugs_t, torch.as_tensor(drug_idx[batch]))
            loss = nn.functional.mse_loss(prediction, y_t[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        val_pred = model.predict_pairs(features, drug_bits, cell_idx[val], drug_idx[val])
        val_pearson = _pearson(y[val], val_pred)
        score = val_pearson if np.isfinite(val_pearson) else -np.inf
        record = {"epoch": epoch, "train_mse": float(np.mean(losses)), "val_pearson": val_pearson,
                  "val_mse": float(np.mean((y[val] - val_pred) ** 2))}
        history.append(record)
        if log_epoch is not None:
            log_epoch(record)
        if progress is not None:
            progress.update(1)
        if score > best_score:
            best_score, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
        else:
            waited += 1
            if waited >= settings.patience:
                break
    model.net.load_state_dict(best_state)
    model.extra["best_epoch"] = best_epoch
    return history


def split_metrics(predictions: pd.DataFrame) -> dict:
    """Model and drug-mean baseline metrics for each set present in ``predictions``."""
    out = {}
    for name, part in predictions.groupby("split", sort=False):
        out[name] = {
            "model": regression_metrics(part["ln_ic50"], part["predicted_ln_ic50"], part["drug"]),
            "drug_mean_baseline": regression_metrics(part["ln_ic50"], part["drug_mean_baseline"], part["drug"]),
        }
    return out
