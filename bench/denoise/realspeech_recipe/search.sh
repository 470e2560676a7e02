# The variants of bench/results/realspeech_recipe/valid_search.md, in the order they ran, from this folder
# (P = the venv python, PYTHONPATH = the repo). noisy_eval.py (the noisy-input row) was not kept.
$P noisy_eval.py
$P explore.py base '{}' 0
$P explore.py floor10 '{"model":{"mask_floor":0.1}}' 0
$P explore.py sisdr02 '{"loss":{"sisdr_weight":0.02}}' 0
$P explore.py floor10_sisdr02 '{"model":{"mask_floor":0.1},"loss":{"sisdr_weight":0.02}}' 0
$P explore.py floor20 '{"model":{"mask_floor":0.2}}' 0
$P explore.py sisdr05 '{"loss":{"sisdr_weight":0.05}}' 0
$P explore.py base '{}' 1
$P explore.py sisdr02 '{"loss":{"sisdr_weight":0.02}}' 1
$P explore.py floor10_sisdr02 '{"model":{"mask_floor":0.1},"loss":{"sisdr_weight":0.02}}' 1
$P explore.py floor05_sisdr02 '{"model":{"mask_floor":0.05},"loss":{"sisdr_weight":0.02}}' 0
$P explore.py sisdr01 '{"loss":{"sisdr_weight":0.01}}' 0
$P explore.py e6_sisdr02 '{"loss":{"sisdr_weight":0.02},"train":{"epochs":6,"valid_metric":"loss"}}' 0
$P explore.py e6_sisdr02 '{"loss":{"sisdr_weight":0.02},"train":{"epochs":6,"valid_metric":"loss"}}' 1
$P explore.py e6_floor10_sisdr02 '{"model":{"mask_floor":0.1},"loss":{"sisdr_weight":0.02},"train":{"epochs":6,"valid_metric":"loss"}}' 0
$P explore.py e6_floor10_sisdr02 '{"model":{"mask_floor":0.1},"loss":{"sisdr_weight":0.02},"train":{"epochs":6,"valid_metric":"loss"}}' 1
$P explore.py e6_base '{"train":{"epochs":6,"valid_metric":"loss"}}' 0
$P explore.py e6_floor05_sisdr02 '{"model":{"mask_floor":0.05},"loss":{"sisdr_weight":0.02},"train":{"epochs":6,"valid_metric":"loss"}}' 0
$P explore.py e6_floor05_sisdr02 '{"model":{"mask_floor":0.05},"loss":{"sisdr_weight":0.02},"train":{"epochs":6,"valid_metric":"loss"}}' 1
$P explore.py e6_base '{"train":{"epochs":6,"valid_metric":"loss"}}' 1
B='"loss":{"sisdr_weight":0.02},"train":{"valid_metric":"loss"}'
$P explore.py sisdr02_vl "{$B}" 2
for s in 0 1 2; do $P explore.py remix_sisdr02_vl "{$B,\"data\":{\"remix\":true}}" $s; done
for s in 0 1 2; do $P explore.py half_sisdr02_vl "{$B,\"model\":{\"preset\":\"student_half\"}}" $s; done
B='"loss":{"sisdr_weight":0.02},"train":{"valid_metric":"loss"}'
for s in 0 1 2; do $P explore.py seg2_sisdr02_vl "{$B,\"data\":{\"segment_seconds\":2.0}}" $s; done
for s in 0 1 2; do $P explore.py floor15_sisdr02_vl "{$B,\"model\":{\"mask_floor\":0.15}}" $s; done
for s in 0 1; do
$P explore.py sp1_sisdr02 '{"loss":{"sisdr_weight":0.02,"speech_loss_weight":1.0},"train":{"valid_metric":"loss"}}' $s
$P explore.py sisdr02_vl '{"loss":{"sisdr_weight":0.02},"train":{"valid_metric":"loss"}}' $s
$P explore.py sp1_floor05_sisdr02 '{"model":{"mask_floor":0.05},"loss":{"sisdr_weight":0.02,"speech_loss_weight":1.0},"train":{"valid_metric":"loss"}}' $s
done
# Real training speech (real_training_speech.md): corpora by synthesize_corpus(..., real_speech_dir=KTUBERLING,
# real_utts_per_speaker=N[, utts_per_speaker=7]) in /work/runs/realtrain/corpus_<name>, then
B='{"loss":{"sisdr_weight":0.02},"train":{"valid_metric":"loss"}}'
for s in 0 1 2; do
  $P explore.py synth_only "$B" $s /tmp/demo_quiet/work/corpus
  for c in real10 real20 real30 real40 s7_real40; do $P explore.py $c "$B" $s /work/runs/realtrain/corpus_$c; done
done
$P teacher_valid.py 6 /work/runs/realtrain/corpus_real40
$P teacher_valid.py 8 /work/runs/realtrain/corpus_real40
# The students' budget (student_budget.md), on the demo corpus, two runs side by side:
C=/work/runs/realtrain/corpus_real40
B='"loss":{"sisdr_weight":0.02},"train":{"valid_metric":"loss"'
for s in 0 1 2; do
  $P explore.py bs4 "{$B,\"batch_size\":4}}" $s $C & $P explore.py lr6 "{$B,\"lr\":6e-3}}" $s $C; wait
  $P explore.py e6 "{$B,\"epochs\":6}}" $s $C & $P explore.py half "{$B},\"model\":{\"preset\":\"student_half\"}}" $s $C; wait
done
for s in 0 1 2; do
  $P explore.py bs2 "{$B,\"batch_size\":2}}" $s $C & $P explore.py bs4_lr6 "{$B,\"batch_size\":4,\"lr\":6e-3}}" $s $C; wait
done
