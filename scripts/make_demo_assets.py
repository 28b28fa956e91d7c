#!/usr/bin/env python
"""Write the bundled demo inputs in assets/demo/ from the PBMC counts that ship with scanpy.

The 700 labelled PBMCs of :func:`scfm.data.demo_data.pbmc68k_counts` (765 genes, integer counts) are split
into two samples by cell index (even → ``pbmc_a``, odd → ``pbmc_b``), stored in two of the input formats:

- ``pbmc_a/``      a 10x matrix directory (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``).
                   The data has gene symbols only, so ``features.tsv.gz`` repeats the symbol in its id and name
                   columns; readers therefore find no Ensembl ids and alignment goes by symbol.
- ``pbmc_b.h5ad``  an AnnData file with the cell-type labels in ``obs['bulk_labels']``.
- ``samplesheet.csv``  both samples, paths relative to the sheet, one batch each.
- ``labels.csv``   ``barcode,sample,bulk_labels`` for every cell, barcodes as QC writes them
                   (``<sample>_<barcode>``), so labels can be joined back to ``pbmc_a`` as well.

Output is deterministic (gzip timestamps are zeroed). Run: ``python scripts/make_demo_assets.py [OUT_DIR]``.
"""

from __future__ import annotations

import gzip
import io
import sys
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "assets" / "demo"
README = """# Demo inputs

Written by `scripts/make_demo_assets.py` (do not edit by hand) from the 700 labelled PBMCs that ship with
scanpy (`scanpy.datasets.pbmc68k_reduced()`, counts recovered by `scfm.data.demo_data`), split by cell index:

| file | format | cells |
|---|---|---|
| `pbmc_a/` | 10x matrix directory (gzipped mtx/features/barcodes) | 350 |
| `pbmc_b.h5ad` | AnnData, labels in `obs['bulk_labels']` | 350 |
| `samplesheet.csv` | `sample,path,batch`, paths relative to the sheet | 2 rows |
| `labels.csv` | `barcode,sample,bulk_labels` with QC barcodes `<sample>_<barcode>` | 700 |

The data has gene symbols only (765 genes, ~250 detected per cell): `features.tsv.gz` repeats the symbol in
its id and name columns, so no Ensembl ids are read and alignment matches by symbol. The QC default
`--min-genes 200` is meant for whole transcriptomes (it already sits near the low tail of this 765-gene
panel); demo and test runs use e.g. `--min-genes 50 --min-cells 3`.
"""


def _gzip_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        out.write(data)


def write_10x_mtx(adata, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    genes_by_cells = sp.coo_matrix(adata.X.T.astype(np.int64))
    scipy.io.mmwrite(buffer, genes_by_cells, field="integer")
    _gzip_bytes(directory / "matrix.mtx.gz", buffer.getvalue())
    features = "".join(f"{g}\t{g}\tGene Expression\n" for g in adata.var_names)
    _gzip_bytes(directory / "features.tsv.gz", features.encode())
    _gzip_bytes(directory / "barcodes.tsv.gz", "".join(f"{b}\n" for b in adata.obs_names).encode())


def make_demo_assets(out: Path = DEFAULT_OUT) -> list[Path]:
    from scfm.data.demo_data import LABEL_KEY, pbmc68k_counts
    from scfm.utils import atomic_output

    cells = pbmc68k_counts()
    samples = {"pbmc_a": cells[0::2].copy(), "pbmc_b": cells[1::2].copy()}
    with atomic_output(out) as tmp:
        tmp.mkdir()
        write_10x_mtx(samples["pbmc_a"], tmp / "pbmc_a")
        samples["pbmc_b"].write_h5ad(tmp / "pbmc_b.h5ad", compression="gzip")
        (tmp / "samplesheet.csv").write_text("sample,path,batch\npbmc_a,pbmc_a,batch1\npbmc_b,pbmc_b.h5ad,batch2\n")
        rows = [
            f"{name}_{barcode},{name},{label}\n"
            for name, adata in samples.items()
            for barcode, label in zip(adata.obs_names, adata.obs[LABEL_KEY])
        ]
        (tmp / "labels.csv").write_text(f"barcode,sample,{LABEL_KEY}\n" + "".join(rows))
        (tmp / "README.md").write_text(README)
    return sorted(p for p in out.rglob("*") if p.is_file())


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    files = make_demo_assets(out)
    total = sum(p.stat().st_size for p in files)
    for path in files:
        print(f"{path.stat().st_size:>9,d}  {path.relative_to(out)}")
    print(f"{total:>9,d}  total in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
