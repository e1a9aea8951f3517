"""Token merging on a transformers ViT: patch, live knob, stats, picture, unpatch.

Run with ``python examples/vit_tome.py [out.png]``. Uses a randomly initialised ViT-B/16 (no
weights can be downloaded offline); with a pretrained model the calls are the same.
"""

from __future__ import annotations

import sys
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

import unipruner.adapters.vit as vit  # also reachable as unipruner.vit
from unipruner import Schedule

torch.manual_seed(0)
torch.set_num_threads(2)
model = ViTForImageClassification(ViTConfig(num_labels=10)).eval()  # ViT-B/16, 224x224
pixels = torch.randn(4, 3, 224, 224)


def timed() -> tuple[torch.Tensor, float]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        logits = model(pixels).logits
        return logits, time.perf_counter() - t0


timed()  # warm-up
ref, t_ref = timed()
h = vit.patch(model, "tome", r=16)  # ToMe: 16 tokens merged per block, CLS protected
print(h.describe())
logits, t = timed()
print("tokens (in, out) per block:", h.stats().tokens)
print(f"ToMe r=16: {t_ref / t:.2f}x faster, top-1 agreement {(logits.argmax(-1) == ref.argmax(-1)).float().mean():.2f}")

h.configure(r=(16, -0.5))  # live knob: ToMe's decreasing schedule, used from the next call on
timed()
last = h.stats()[-1]
print(f"after the last block: {last.n_out} tokens stand for {int(last.kept[0].sum())} of {last.owner.shape[1]}")

# switch method: EViT, inattentive tokens fused, 30 % of the patches left after the last block
h.configure("evit", schedule=Schedule.geometric(final=0.3), reduction="fuse")
timed()
print("EViT tokens per block:", [r.n_out for r in h.stats()])

if len(sys.argv) > 1:
    vit.visualize(model, pixels, sys.argv[1], layers=[0, 5, 11])
    print("wrote", sys.argv[1])

vit.unpatch(model)
assert torch.equal(timed()[0], ref)  # exactly the original model again
print("unpatched: outputs identical to before")
