"""LongLLMLingua side by side (run by benchmarks/rag.py inside .venv-llmlingua, not by pytest).

Usage: ``.venv-llmlingua/bin/python benchmarks/_rag_llmlingua.py IN.json OUT.json`` where IN
holds ``{"model_dir": ..., "items": [{"question", "docs", "ratios"}]}``. Runs llmlingua 0.2.2's
``PromptCompressor`` offline with SmolLM2-135M-Instruct as its language model (tiktoken's
``encoding_for_model`` replaced by the model's own tokenizer, which is what counts tokens here
anyway) in LongLLMLingua mode (Jiang et al., ACL 2024: question-aware coarse-to-fine,
``rank_method="longllmlingua"``), and writes the compressed contexts and seconds per query.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def main(src: str, dst: str) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(int(os.environ.get("RAG_THREADS", "2")))
    job = json.load(open(src, encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(job["model_dir"])

    class _HFEncoding:  # what llmlingua uses of a tiktoken Encoding
        def encode(self, text: str, **_: object) -> list[int]:
            return list(tok(text, add_special_tokens=False)["input_ids"])

        def decode(self, ids: list[int], **_: object) -> str:
            return str(tok.decode(ids))

    import llmlingua.prompt_compressor as pc

    pc.tiktoken.encoding_for_model = lambda *_a, **_k: _HFEncoding()
    comp = pc.PromptCompressor(model_name=job["model_dir"], device_map="cpu")
    out = []
    for item in job["items"]:
        res = {}
        for r in item["ratios"]:
            t0 = time.perf_counter()
            c = comp.compress_prompt(
                item["docs"], question=item["question"], rate=float(r), condition_in_question="after_condition",
                reorder_context="original", dynamic_context_compression_ratio=0.3, condition_compare=True,
                context_budget="+100", rank_method="longllmlingua", concate_question=False,
                use_sentence_level_filter=False,
            )
            res[str(r)] = {"text": c["compressed_prompt"], "seconds": time.perf_counter() - t0}
        out.append(res)
        print(f"llmlingua {len(out)}/{len(job['items'])}", flush=True)
    tmp = dst + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(tmp, dst)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
