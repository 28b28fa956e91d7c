"""Drug response: ln IC50 regression on bulk cell lines (DeepCDR-style) and sensitivity transfer to single
cells (SCAD-style).

    data.py          response / SMILES tables, cell features (scfm embedding, expression or PCA), overlap checks
    fingerprints.py  SMILES -> Morgan fingerprints (RDKit); unparsable SMILES are listed and skipped
    regression.py    the two-branch network, training with early stopping, metrics, the model directory
    transfer.py      sensitive / resistant labels, adversarial domain adaptation, per-cell scores
    modeldir.py      the model directories: config.json + model.safetensors, nothing pickled
    plots.py         figures for the model directories
    run.py           what `scfm drug train | predict | adapt | score` do: read, check, write atomically
"""
