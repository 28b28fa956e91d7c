"""SMILES -> Morgan (ECFP-like) bit fingerprints with RDKit.

Why fingerprints and not a graph encoder: GDSC has a few hundred drugs, so a graph network learns its
drug branch from a few hundred examples; a fixed circular fingerprint gives the same kind of substructure
information with nothing to learn, is deterministic, and costs microseconds per drug on a CPU. It still
lets a trained model score a drug it never saw (by structure), which is what the unseen-drug split tests.

    morgan_fingerprints(smiles: dict[str, str], radius=2, n_bits=1024) -> Fingerprints
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_RADIUS = 2
DEFAULT_BITS = 1024


@dataclass
class Fingerprints:
    drugs: list[str]  # drugs whose SMILES parsed, in input order
    bits: np.ndarray  # (n_drugs, n_bits) float32 of 0/1
    unparsable: list[str] = field(default_factory=list)  # drugs whose SMILES RDKit could not read


def _rdkit():
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")  # a bad SMILES is reported by us, once, not by RDKit on stderr
    return Chem, rdFingerprintGenerator


def morgan_fingerprints(smiles: dict[str, str], radius: int = DEFAULT_RADIUS, n_bits: int = DEFAULT_BITS
                        ) -> Fingerprints:
    """One row of bits per drug whose SMILES RDKit can parse; the others are listed in ``unparsable``."""
    chem, generators = _rdkit()
    generator = generators.GetMorganGenerator(radius=radius, fpSize=n_bits)
    drugs, rows, unparsable = [], [], []
    for drug, text in smiles.items():
        molecule = chem.MolFromSmiles(str(text)) if text and str(text).strip() else None
        if molecule is None:
            unparsable.append(drug)
            continue
        drugs.append(drug)
        rows.append(generator.GetFingerprintAsNumPy(molecule).astype(np.float32))
    bits = np.stack(rows) if rows else np.zeros((0, n_bits), dtype=np.float32)
    return Fingerprints(drugs, bits, unparsable)
