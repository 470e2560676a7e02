"""Demo teacher on a corpus, E epochs, scored on the real-speech VALID split (as run; see search.sh and
bench/results/realspeech_recipe/teacher_epochs.md)."""
import json, sys, time
from pathlib import Path
import torch
from pycosdist.denoise import config as C, data, demo, evaluation, training
epochs, corpus = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
cfg = C.merge(demo.demo_config("teacher"), {"train": {"epochs": epochs, "threads": 1, "eval_workers": 0}})
out = Path("/work/runs/realtrain/runs") / f"teacher_e{epochs}_{Path(corpus).name}"  # work folder
t = time.time()
s = training.train(cfg, corpus, out, progress=False, log=lambda *a: None)
wall = time.time() - t
model = training.load_model(out / "best.pt")[0]
res = {}
for sub in ("stationary", "babble"):
    ds = data.load_corpus(f"/work/runs/real_valid/{sub}").test
    r = evaluation.evaluate(lambda x: model(x[None])[0], ds, out / "eval", f"real_{sub}", workers=0)
    res[sub] = {k: round(r[k], 4) for k in ("pesq", "stoi", "si_sdr")}
print("teacher", epochs, Path(corpus).name, json.dumps(res), "best", s["best"], "train_s", round(wall), flush=True)
