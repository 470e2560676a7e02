"""Issue 10 recipe search: one demo-budget student (no KD) under a recipe variant, scored on the
real-speech VALID split; the results are in bench/results/realspeech_recipe/. Usage (as run, from this
folder; see search.sh):

    python explore.py NAME '{"loss": {"sisdr_weight": 0.02}}' SEED [CORPUS]

CORPUS is the demo corpus (pycosdist data synth), REAL_VALID the output of
`pycosdist data realtest REAL_VALID --split valid`; valid_search.md collects the printed lines."""
import json, sys
from pathlib import Path
import torch
from pycosdist.denoise import config as C, data, demo, evaluation, training
name, upd, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
cfg = C.merge(C.merge(demo.demo_config("student"), demo.DEMO_STUDENT_BUDGET), {"kd": {"method": "none", "teacher_cache": False}, "train": {"seed": seed, "threads": 1, "eval_workers": 0}})
cfg = C.merge(cfg, upd)
out = Path("/work/runs/explore") / f"{name}_s{seed}"  # work folder
corpus = sys.argv[4] if len(sys.argv) > 4 else "/tmp/demo_quiet/work/corpus"  # CORPUS (the demo corpus)
s = training.train(cfg, corpus, out, progress=False, log=lambda *a: None)
model = training.load_model(out / "best.pt")[0]
res = {}
for sub in ("stationary", "babble"):
    ds = data.load_corpus(f"/work/runs/real_valid/{sub}").test  # REAL_VALID
    r = evaluation.evaluate(lambda x: model(x[None])[0], ds, out / "eval", f"real_{sub}", workers=0)
    res[sub] = {k: round(r[k], 4) for k in ("pesq", "stoi", "si_sdr")}
print(name, seed, json.dumps(res), "best", s["best"], flush=True)
