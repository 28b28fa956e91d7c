"""Fine-tuning: a cell-type classifier head on the cell embedding, judged against a PCA baseline.

Recipe, and why:

- **Input**: one or several aligned h5ad files (raw counts in vocabulary order). Each one's
  ``uns['scfm']['vocab_sha256']`` must be the checkpoint's, or gene i of the data would feed token i of
  another vocabulary.
- **Labels**: cells without a label (or inputs without the label column) are left out; classes with
  fewer than ``min_cells_per_class`` cells over all inputs cannot be split three ways and are left
  out too (all counted in ``metrics.json``, per input under ``inputs``).
- **Split**: stratified train / validation / test over the labelled cells of all inputs, seeded,
  written to ``split.csv`` (cell id, its input, label, part) so that anyone can score other methods on
  the same cells.
- **Embedding**: the same recipe as ``scfm embed``'s defaults (``log1p(x / total * 1e4)``, T = 4,
  pool ``all``), so the head also works on ``obsm['X_scfm']`` written by ``scfm embed`` from this
  checkpoint. With the encoder frozen (default) the embeddings are computed once; with
  ``unfreeze_layers = k`` the last k encoder layers (and the final norm) train with the head, at
  ``lr * encoder_lr_ratio`` (0.01: the head reads differences between cells that are small next to
  the embedding's offset, so larger encoder steps wreck what it learned), and the classifier
  directory holds the new full weights (embed with it as ``--checkpoint``).
- **Head**: Linear → ReLU → Dropout → Linear, cross-entropy with inverse-frequency class weights
  (rare cell types are what annotation is for), AdamW; early stopping on validation macro-F1 with
  ``patience`` epochs; the best epoch's weights are kept.
- **Baseline**: logistic regression on 50 PCA components of the same log-normalised cells, fitted on
  the same training cells (PCA included), scored on the same test cells.

Classifier directory = checkpoint files (``config.json``, ``model.safetensors``, ``vocab.tsv``) +
``labels.json``, ``head.safetensors``, ``metrics.json``, ``split.csv``. ``load_classifier`` and
``predict_proba`` are what ``scfm annotate --classifier`` uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from scfm.errors import ScfmError, ScfmUsageError
from scfm.utils import atomic_output, progress

LABELS_FILE = "labels.json"
HEAD_FILE = "head.safetensors"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
TARGET_DEPTH = "t4"  # scfm embed's default, so heads apply to its embeddings
PRE_NORMALIZED = "F"
BASELINE_COMPONENTS = 50


@dataclass
class FinetuneSettings:
    input_path: str | Sequence[str]  # one aligned h5ad, or several aligned to the same vocabulary
    out_dir: str
    checkpoint: str
    label_key: str
    ckpt_version: str = "ce"
    vocab: str | None = None
    unfreeze_layers: int = 0
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr_ratio: float = 0.01  # unfrozen encoder layers learn at lr * this: the head reads small differences
    weight_decay: float = 0.01
    hidden_dim: int = 256
    dropout: float = 0.1
    patience: int = 5
    test_size: float = 0.2
    val_size: float = 0.1
    pool: str = "all"
    min_cells_per_class: int = 5
    precision: str = "auto"  # auto | fp32 | bf16 for the encoder on a CPU (see scfm.model.precision)
    seed: int = 0
    quiet: bool = False
    mlflow_uri: str | None = None

    @property
    def input_paths(self) -> list[str]:
        paths = [self.input_path] if isinstance(self.input_path, (str, Path)) else list(self.input_path)
        return [str(p) for p in paths]

    def validate(self) -> None:
        if not self.input_paths:
            raise ScfmUsageError("give at least one aligned INPUT.h5ad")
        names = [Path(p).name for p in self.input_paths]
        if len(set(names)) < len(names):
            raise ScfmUsageError(f"inputs must have distinct file names (split.csv names each cell's input): "
                                 f"{', '.join(names)}")
        for name in ("epochs", "batch_size", "patience", "min_cells_per_class", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ScfmUsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.unfreeze_layers < 0:
            raise ScfmUsageError("--unfreeze-layers must not be negative")
        if not (0 < self.test_size < 1 and 0 < self.val_size < 1 and self.test_size + self.val_size < 1):
            raise ScfmUsageError("--test-size and --val-size must be in (0, 1) and sum to less than 1")
        if self.lr <= 0:
            raise ScfmUsageError("--lr must be positive")
        if self.pool not in ("all", "max"):
            raise ScfmUsageError("--pool must be all or max")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ScfmUsageError(f"--precision must be auto, fp32 or bf16, got {self.precision!r}")


# ------------------------------------------------------------------------------------------ the head


class ClassifierHead(nn.Module):
    """Standardise the embedding with training-set statistics, then a one-hidden-layer MLP.

    Cell embeddings vary little between cells compared with their common offset (a LayerNorm output
    pooled over genes), so without the standardisation the head would learn almost nothing.
    """

    def __init__(self, embedding_dim: int, n_classes: int, hidden_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(embedding_dim))
        self.register_buffer("feature_std", torch.ones(embedding_dim))
        self.net = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim),  # (B, E) -> (B, H)
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, n_classes),  # (B, H) -> (B, C) logits
        )

    @torch.no_grad()
    def fit_standardisation(self, embeddings: torch.Tensor) -> None:
        self.feature_mean.copy_(embeddings.mean(dim=0))
        self.feature_std.copy_(embeddings.std(dim=0).clamp_min(1e-6))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net((embedding - self.feature_mean) / self.feature_std)


class Classifier(NamedTuple):
    """What :func:`load_classifier` returns; unpacks as ``model, head, labels, config``."""

    model: nn.Module  # XTrimoGene (eval mode)
    head: ClassifierHead  # eval mode
    labels: list[str]  # class names, column order of predict_proba
    config: dict  # labels.json: label_key, pool, target_depth, embedding_dim, ...

    @property
    def embedding_dim(self) -> int:
        return int(self.config["embedding_dim"])

    @property
    def pool(self) -> str:
        return self.config["pool"]


def load_classifier(directory) -> Classifier:
    """Read a classifier directory written by ``scfm finetune``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from scfm.model.checkpoint import load_checkpoint

    directory = Path(directory)
    for name in (LABELS_FILE, HEAD_FILE):
        if not (directory / name).is_file():
            raise ScfmError(f"not a classifier directory: {name} is missing", directory)
    try:
        config = json.loads((directory / LABELS_FILE).read_text())
        labels = [str(label) for label in config["labels"]]
        head = ClassifierHead(int(config["embedding_dim"]), len(labels), int(config["hidden_dim"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OSError) as exc:
        raise ScfmError(f"unreadable classifier labels ({type(exc).__name__}: {exc})", directory / LABELS_FILE) from exc
    try:
        weights = load_file(str(directory / HEAD_FILE))
        head.load_state_dict(weights)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ScfmError(f"unreadable classifier head ({_first_line(exc)})", directory / HEAD_FILE) from exc
    if not all(bool(torch.isfinite(w).all()) for w in weights.values() if w.is_floating_point()):
        raise ScfmError("classifier head holds NaN or infinite weights", directory / HEAD_FILE)
    loaded = load_checkpoint(directory)
    return Classifier(loaded.model.eval(), head.eval(), labels, config)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def accepted_checkpoint_sha256s(classifier_dir, config: dict) -> set[str]:
    """The ``checkpoint_sha256`` values (see ``scfm embed``) of embeddings this classifier's head can read.

    Embedding with the classifier directory itself gives the weights it was trained with; with the
    encoder frozen during fine-tuning, the checkpoint it started from gives the same embeddings.
    """
    from scfm.model.checkpoint import checkpoint_sha256

    accepted = {config.get("checkpoint_sha256") or checkpoint_sha256(classifier_dir)}
    if int(config.get("unfreeze_layers", 0)) == 0 and config.get("source_checkpoint_sha256"):
        accepted.add(config["source_checkpoint_sha256"])
    return accepted


def predict_proba(classifier: Classifier, embeddings, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities (cells, classes) for cell embeddings (cells, embedding_dim)."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != classifier.embedding_dim:
        raise ScfmError(f"embeddings have shape {embeddings.shape}, the classifier expects "
                        f"(cells, {classifier.embedding_dim})")
    head = classifier.head.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(embeddings), batch_size):
            logits = head(torch.from_numpy(embeddings[start:start + batch_size]))
            out.append(torch.softmax(logits.float(), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(classifier.labels)), dtype=np.float32)


# ------------------------------------------------------------------------------------------ data


@dataclass
class LabelledCells:
    counts: sp.csr_matrix  # (cells, n_genes) raw counts, vocabulary order
    labels: np.ndarray  # (cells,) str
    cell_ids: np.ndarray  # (cells,) str
    inputs: np.ndarray  # (cells,) str: file name of the input each cell came from
    dropped_classes: dict  # class -> cells, too rare to split
    n_unlabelled: int
    per_input: list  # per input: file name, cells, labelled cells, whether it has the label column


def _read_aligned(path: Path, vocab):
    import anndata as ad

    if not path.is_file():
        raise ScfmError("input file not found", path)
    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:
        raise ScfmError(f"not a readable h5ad file ({exc.__class__.__name__}: {exc})", path) from exc
    sha = dict(adata.uns.get("scfm", {}) or {}).get("vocab_sha256")
    if sha is None:
        raise ScfmError("not an aligned h5ad (uns['scfm']['vocab_sha256'] is missing; run `scfm align` first)", path)
    if sha != vocab.sha256:
        raise ScfmError(f"aligned to another vocabulary (vocab_sha256 {str(sha)[:12]}…, the checkpoint's is "
                        f"{vocab.sha256[:12]}…)", path)
    if adata.n_vars != len(vocab):
        raise ScfmError(f"{adata.n_vars} genes, the checkpoint's vocabulary has {len(vocab)}", path)
    from scfm.data.io import check_values

    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if not check_values(adata.X.data, path, "X"):  # what scfm align guarantees; a hand-made file may not
        raise ScfmError("X does not hold raw counts (an aligned h5ad from `scfm align` does)", path)
    return adata


def _labelled_rows(adata, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(mask of cells with a non-empty label, labels as str); no column = no labelled cell."""
    if label_key not in adata.obs.columns:
        return np.zeros(adata.n_obs, dtype=bool), np.full(adata.n_obs, "", dtype=object)
    raw = adata.obs[label_key]
    labelled = raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
    return labelled, raw.astype(str).to_numpy()


def read_labelled_cells(paths, label_key: str, vocab, min_cells_per_class: int) -> LabelledCells:
    """The labelled cells of one or several aligned inputs (all checked before any is used)."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    counts, labels, cell_ids, inputs, per_input = [], [], [], [], []
    for path in paths:
        adata = _read_aligned(path, vocab)
        labelled, values = _labelled_rows(adata, label_key)
        rows = np.flatnonzero(labelled)
        counts.append(sp.csr_matrix(adata.X, dtype=np.float32)[rows])
        labels.append(values[rows])
        cell_ids.append(adata.obs_names.to_numpy()[rows].astype(str))
        inputs.append(np.full(len(rows), path.name, dtype=object))
        per_input.append({"input": path.name, "n_cells": int(adata.n_obs), "n_labelled": int(len(rows)),
                          "has_label_column": label_key in adata.obs.columns})
        if len(paths) == 1 and not per_input[0]["has_label_column"]:
            raise ScfmError(f"no obs column {label_key!r} (columns: {', '.join(map(str, adata.obs.columns))})", path)
    if not any(entry["has_label_column"] for entry in per_input):
        names = ", ".join(entry["input"] for entry in per_input)
        raise ScfmError(f"no obs column {label_key!r} in any input ({names})", paths[0])
    labels_all = np.concatenate(labels).astype(str)
    sizes = pd.Series(labels_all).value_counts()
    rare = sizes[sizes < min_cells_per_class]
    keep = ~np.isin(labels_all, rare.index.to_numpy())
    if len(set(labels_all[keep])) < 2:
        raise ScfmError(f"need at least two classes with >= {min_cells_per_class} labelled cells in "
                        f"obs[{label_key!r}]", paths[0])
    all_counts = sp.vstack(counts, format="csr")[np.flatnonzero(keep)]
    all_counts.sort_indices()
    inputs_all = np.concatenate(inputs)[keep].astype(str)
    empty = np.asarray(all_counts.sum(axis=1)).ravel() <= 0
    if empty.any():
        first = paths[[p.name for p in paths].index(inputs_all[np.flatnonzero(empty)[0]])]
        raise ScfmError("some labelled cells have no counts (run `scfm qc` first)", first)
    n_unlabelled = sum(entry["n_cells"] - entry["n_labelled"] for entry in per_input)
    return LabelledCells(all_counts, labels_all[keep], np.concatenate(cell_ids)[keep], inputs_all,
                         {str(k): int(v) for k, v in rare.items()}, int(n_unlabelled), per_input)


def stratified_split(labels: np.ndarray, test_size: float, val_size: float, seed: int) -> np.ndarray:
    """Per cell ``"train"``, ``"val"`` or ``"test"``; every class lands in each part."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=test_size, stratify=labels, random_state=seed)
    val_share = val_size / (1.0 - test_size)
    train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    split = np.empty(len(labels), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def log_normalised(counts: sp.csr_matrix) -> sp.csr_matrix:
    from scfm.model.inputs import normalize_counts

    return normalize_counts(counts, pre_normalized="F")[0]


# ------------------------------------------------------------------------------------------ embedding


class EncoderFeatures:
    """Cell embeddings of rows of a count matrix, with or without gradients (``bf16``: autocast on the CPU)."""

    def __init__(self, model, counts: sp.csr_matrix, pool: str, bf16: bool = False):
        from scfm.model.inputs import depth_tokens, normalize_counts

        self.model = model
        self.pool = pool
        self.bf16 = bf16
        self.normalised, totals = normalize_counts(counts, pre_normalized=PRE_NORMALIZED)
        self.target, self.source = depth_tokens(totals, TARGET_DEPTH)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        from scfm.model.inputs import encoder_inputs_from_csr

        net = self.model
        enc = encoder_inputs_from_csr(self.normalised, self.target, self.source, net.config, rows)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            encoded = net.encode(enc.values, enc.gene_ids, enc.padding_mask)
            return net.cell_embedding(encoded, enc, self.pool).float()

    @torch.no_grad()
    def all(self, rows: np.ndarray, batch_size: int = 128) -> torch.Tensor:
        return torch.cat([self(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)])

    def bf16_cosine(self, n_cells: int = 16) -> float:
        """Worst per-cell cosine between the bf16 and fp32 embeddings of the first cells (eval mode)."""
        from scfm.model.precision import min_row_cosine

        rows = np.arange(min(n_cells, self.normalised.shape[0]))
        was_training, was_bf16 = self.model.training, self.bf16
        self.model.eval()
        try:
            self.bf16 = False
            fp32 = self.all(rows).numpy()
            self.bf16 = True
            bf16 = self.all(rows).numpy()
        finally:
            self.model.train(was_training)
            self.bf16 = was_bf16
        return min_row_cosine(fp32, bf16)


def unfreeze_last_layers(model, k: int) -> list[nn.Parameter]:
    """Freeze everything, then let the last ``k`` encoder layers and the encoder's final norm train."""
    for param in model.parameters():
        param.requires_grad_(False)
    if k == 0:
        return []
    if k > len(model.encoder):
        raise ScfmUsageError(f"--unfreeze-layers {k}: the encoder has only {len(model.encoder)} layers")
    trainable = [p for layer in model.encoder[-k:] for p in layer.parameters()]
    trainable += list(model.encoder_norm.parameters())
    for param in trainable:
        param.requires_grad_(True)
    return trainable


# ------------------------------------------------------------------------------------------ metrics


def classification_metrics(truth: np.ndarray, predicted: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "n_cells": int(len(truth)),
    }


def pca_logistic_baseline(counts: sp.csr_matrix, labels: np.ndarray, split: np.ndarray, seed: int) -> dict:
    """Logistic regression on 50 PCA components of log-normalised counts; PCA fitted on training cells."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = log_normalised(counts).toarray()
    train, test = split == "train", split == "test"
    n_components = int(min(BASELINE_COMPONENTS, x.shape[1] - 1, train.sum() - 1))
    mean = x[train].mean(axis=0)
    svd = TruncatedSVD(n_components=n_components, random_state=seed).fit(x[train] - mean)  # PCA = SVD of centred
    pcs = svd.transform(x - mean)
    scaler = StandardScaler().fit(pcs[train])
    model = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    model.fit(scaler.transform(pcs[train]), labels[train])
    predicted = model.predict(scaler.transform(pcs[test]))
    return {**classification_metrics(labels[test], predicted), "method": f"logistic regression on {n_components} PCs"}


# ------------------------------------------------------------------------------------------ training


def class_weights(labels_idx: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels_idx, minlength=n_classes).astype(np.float64)
    weights = counts.sum() / (n_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


def train_head(settings: FinetuneSettings, model, features: EncoderFeatures, y: np.ndarray, split: np.ndarray,
               n_classes: int, run) -> tuple[ClassifierHead, dict, list[dict]]:
    """Train the head (and unfrozen layers); early stopping on validation macro-F1; best epoch restored."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(settings.seed)
    train_rows, val_rows = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    trainable = unfreeze_last_layers(model, settings.unfreeze_layers)
    frozen = not trainable
    cached = features.all(np.arange(len(y))) if frozen else None

    def embed(rows, grad: bool):
        if frozen:
            return cached[rows]
        with torch.set_grad_enabled(grad):
            return features(rows) if grad else features.all(rows)

    train_embeddings = embed(train_rows, grad=False)
    with torch.random.fork_rng():  # seeded head init and dropout, independent of the caller's RNG state
        torch.manual_seed(settings.seed)
        head = ClassifierHead(train_embeddings.shape[1], n_classes, settings.hidden_dim, settings.dropout)
    head.fit_standardisation(train_embeddings)
    groups = [{"params": list(head.parameters()), "lr": settings.lr}]
    if trainable:
        groups.append({"params": trainable, "lr": settings.lr * settings.encoder_lr_ratio})
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y[train_rows], n_classes))
    y_t = torch.from_numpy(y.astype(np.int64))

    best = {"val_macro_f1": -1.0, "epoch": 0}
    best_state = None
    history: list[dict] = []
    bar = progress(total=settings.epochs, desc="finetune", unit="epoch", quiet=settings.quiet)
    for epoch in range(1, settings.epochs + 1):
        head.train()
        order = rng.permutation(train_rows)
        losses = []
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            logits = head(embed(rows, grad=True))
            loss = loss_fn(logits, y_t[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.item()))
        head.eval()
        with torch.no_grad():
            val_pred = head(embed(val_rows, grad=False)).argmax(dim=1).numpy()
        val_f1 = float(f1_score(y[val_rows], val_pred, average="macro", zero_division=0))
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_macro_f1": val_f1,
               "val_accuracy": float((val_pred == y[val_rows]).mean())}
        history.append(row)
        run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
        bar.update(1)
        if val_f1 > best["val_macro_f1"]:
            best = {"val_macro_f1": val_f1, "epoch": epoch}
            best_state = _snapshot(head, model, trainable)
        elif epoch - best["epoch"] >= settings.patience:
            break
    bar.close()
    _restore(head, model, best_state)
    return head, best, history


def _snapshot(head, model, trainable) -> dict:
    state = {"head": {k: v.detach().clone() for k, v in head.state_dict().items()}}
    if trainable:
        state["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state


def _restore(head, model, state) -> None:
    head.load_state_dict(state["head"])
    if "model" in state:
        model.load_state_dict(state["model"])


# ------------------------------------------------------------------------------------------ the step


def finetune(settings: FinetuneSettings) -> dict:
    """Fine-tune, evaluate on the held-out split, compare with the baseline, write the classifier dir."""
    from safetensors.torch import save_file

    from scfm import tracking
    from scfm.model.checkpoint import (WEIGHTS_FILE, checkpoint_sha256, file_sha256, load_checkpoint,
                                       save_checkpoint)
    from scfm.model.precision import announce, choose_precision, cpu_native_bf16
    from scfm.utils import seed_everything

    settings.validate()
    seed_everything(settings.seed)
    loaded = load_checkpoint(settings.checkpoint, version=settings.ckpt_version, vocab=settings.vocab)
    model, vocab = loaded.model.float().eval(), loaded.vocab
    if settings.unfreeze_layers > len(model.encoder):
        raise ScfmUsageError(f"--unfreeze-layers {settings.unfreeze_layers}: the encoder has only "
                             f"{len(model.encoder)} layers")
    cells = read_labelled_cells(settings.input_paths, settings.label_key, vocab, settings.min_cells_per_class)
    classes = sorted(set(cells.labels))
    y = np.searchsorted(np.asarray(classes), cells.labels)
    split = stratified_split(cells.labels, settings.test_size, settings.val_size, settings.seed)

    features = EncoderFeatures(model, cells.counts, settings.pool)
    precision = announce(choose_precision(settings.precision, "cpu", native_bf16=cpu_native_bf16,
                                          bf16_cosine=features.bf16_cosine, encoder_dim=model.config.encoder_dim))
    features.bf16 = precision.precision == "bf16"

    out_dir = Path(settings.out_dir)
    uri = tracking.resolve_uri(settings.mlflow_uri, out_dir.parent)
    params = {**dataclasses.asdict(settings), "resolved_precision": precision.precision,
              "precision_reason": precision.reason, "input_path": settings.input_paths, "n_cells": len(y),
              "n_inputs": len(settings.input_paths), "n_classes": len(classes),
              "checkpoint_source": loaded.source, "model": loaded.config.to_dict()}
    with tracking.step_run("finetune", uri=uri, params=params) as run:
        head, best, history = train_head(settings, model, features, y, split, len(classes), run)
        test_rows = np.flatnonzero(split == "test")
        with torch.no_grad():
            test_pred = head(features.all(test_rows)).argmax(dim=1).numpy()
        test = classification_metrics(cells.labels[test_rows], np.asarray(classes)[test_pred])
        baseline = pca_logistic_baseline(cells.counts, cells.labels, split, settings.seed)
        metrics = {
            "test": test,
            "baseline": baseline,
            "best_epoch": best["epoch"],
            "precision": precision.precision,
            "precision_reason": precision.reason,
            "val_macro_f1": best["val_macro_f1"],
            "epochs_run": len(history),
            "classes": {c: int((cells.labels == c).sum()) for c in classes},
            "split_sizes": {s: int((split == s).sum()) for s in ("train", "val", "test")},
            "dropped_rare_classes": cells.dropped_classes,
            "n_unlabelled": cells.n_unlabelled,
            "inputs": cells.per_input,
            "history": history,
        }
        label_config = {
            "labels": classes, "label_key": settings.label_key, "embedding_dim": int(head.net[0].in_features),
            "hidden_dim": settings.hidden_dim, "pool": settings.pool, "target_depth": TARGET_DEPTH,
            "pre_normalized": PRE_NORMALIZED, "unfreeze_layers": settings.unfreeze_layers,
            "source_checkpoint": loaded.source, "vocab_sha256": vocab.sha256,
            "source_checkpoint_sha256": checkpoint_sha256(settings.checkpoint, settings.ckpt_version),
        }
        with atomic_output(out_dir) as tmp:
            save_checkpoint(tmp, model, loaded.config, vocab,
                            extra={"finetune": {"label_key": settings.label_key,
                                                "unfreeze_layers": settings.unfreeze_layers}})
            # what `scfm embed --checkpoint <this directory>` records; annotate compares the two
            label_config["checkpoint_sha256"] = file_sha256(tmp / WEIGHTS_FILE)
            save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / HEAD_FILE))
            (tmp / LABELS_FILE).write_text(json.dumps(label_config, indent=2) + "\n")
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
            pd.DataFrame({"cell_id": cells.cell_ids, "input": cells.inputs, "label": cells.labels,
                          "split": split}).to_csv(
                tmp / SPLIT_FILE, index=False)
        run.log_metrics({
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "baseline_accuracy": baseline["accuracy"], "baseline_macro_f1": baseline["macro_f1"],
            "best_val_macro_f1": best["val_macro_f1"],
        }, step=len(history))
        for name in (METRICS_FILE, SPLIT_FILE, LABELS_FILE):
            run.log_artifact(out_dir / name)
        run.log_artifact(out_dir, artifact_path="classifier")
        metrics["mlflow_run_id"] = run.run_id
    return metrics
