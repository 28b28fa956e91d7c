"""Gene modules and regulatory networks from the model's gene embeddings (``scfm genes``).

    embeddings.py   gene statistics, cell sampling, streamed mean decoder embedding per gene (and per group)
    modules.py      cosine kNN graph, Leiden modules, hubs, expression-matched module scores per cell, baselines
    enrichment.py   GO BP over-representation per module (hypergeometric, Benjamini-Hochberg)
    network.py      TF -> target edges by embedding similarity, arboreto- or decoupler-style tables
    steps.py        gene_modules_file / gene_network_file: what the two commands run

GO annotations come from :mod:`scfm.data.go`; the report section from :mod:`scfm.report.genes`.
"""
