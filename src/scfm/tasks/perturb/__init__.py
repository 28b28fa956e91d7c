"""Perturbation response prediction (``scfm perturb``).

    guides.py     guide-count matrix → per-cell perturbation label (``scfm perturb assign``)
    data.py       aligned h5ads → cells grouped by perturbation, checked; targets; log1p CP10k means
    graph.py      gene-gene graphs: a prior edge list (``--gene-graph``), co-expression of control cells
    features.py   gene features: scfm gene context embeddings of control cells, or the ablations'
    model.py      the GEARS-style network and its training loop
    baselines.py  no change, mean of training perturbations, linear model on gene expression profiles
    evaluate.py   metrics on mean changes; folds that hold out whole target genes
    predictor.py  a trained predictor and its directory format
    run.py        what ``scfm perturb train`` and ``scfm perturb predict`` run
"""
