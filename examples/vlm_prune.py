"""Visual-token pruning on a LLaVA: three stages, a batch of different images, stats, picture, unpatch.

Run with ``python examples/vlm_prune.py [out.png]``. Uses the repository's fixture model (a small
LLaVA trained on synthetic scenes: no VLM weights can be downloaded offline); with a real
``LlavaForConditionalGeneration`` / Qwen2-VL / SmolVLM the calls are the same.
"""

from __future__ import annotations

import sys

import torch

import unipruner
from unipruner.adapters.vlm import scenes, stage
from unipruner.models import load_vlm_fixture

model, processor = load_vlm_fixture()
processor.tokenizer.padding_side = "left"
batch = scenes.samples(scenes.HELDOUT_SEED, 4)
inputs = processor(images=[s.image for s in batch], text=[scenes.prompt(s.question) for s in batch],
                   return_tensors="pt", padding=True)
n_visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
keep = max(1, round(n_visual * 64 / 576))  # LLaVA-1.5's 64 of 576, as a fraction of this model's tokens


def answers() -> list[str]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return processor.tokenizer.convert_ids_to_tokens(out[:, -1].tolist())


print("questions:", [s.question for s in batch])
print("truth:    ", [s.answer for s in batch])
print("all tokens", answers())
for method, kw in (("divprune", {"stage": "input"}), ("visionzip", {"stage": "vision"}),
                   ("fastv", {"stage": "llm", "layer": 1})):
    with unipruner.vlm.patch(model, method, keep=keep, **kw) as h:
        print(f"{method:10s}", answers(), "|", h.stats())

schedule = [stage("visionzip", "vision", keep=3 * keep), stage("fastv", "llm", layer=1, keep=keep)]
with unipruner.vlm.patch(model, schedule) as h:
    print(h.describe())
    print("schedule  ", answers(), "|", h.stats())
    if len(sys.argv) > 1:
        unipruner.vlm.visualize(model, dict(inputs), sys.argv[1], image=batch[0].image, index=0)
        print("picture written to", sys.argv[1])
assert unipruner.vlm.find(model) is None  # leaving the block unpatched the model
