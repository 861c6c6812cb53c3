#!/usr/bin/env bash
# Retrieval quality and evaluation speed (issue: retrieval evaluation). Run from the repository root
# after `python benchmarks/train_scifact.py --eval` (which leaves the SciFact fine-tune in ../bench-work).
#   bash benchmarks/quality.sh            # scifact + medquad, ~40 min on 2 cores
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=../shared/data
WORK=../bench-work
BASE=sentence-transformers/all-MiniLM-L6-v2
mkdir -p benchmarks/results

# SciFact: the 300 test claims over 5,183 abstracts, zero-shot vs the 1-epoch fine-tune.
bge-ray eval --model "$BASE" --model "$WORK/bge_ray_np2_e1_zero2" --data "$DATA/scifact" \
  --query_max_len 64 --passage_max_len 256 --output benchmarks/results/eval_scifact

# MedQuAD: fine-tune on 2,000 training questions (in-batch negatives: the data has none), then
# evaluate both on the 1,449 held-out questions over 15,809 answers.
bge-ray train --model_name_or_path "$BASE" --train_data "$DATA/medquad/train_triplets.jsonl" \
  --max_example_num_per_dataset 2000 --train_group_size 1 --per_device_train_batch_size 16 \
  --query_max_len 64 --passage_max_len 256 --learning_rate 2e-5 --warmup_ratio 0.1 --num_train_epochs 1 \
  --temperature 0.02 --sentence_pooling_method mean --num_workers 2 --deepspeed zero2 \
  --logging_steps 10 --save_steps 100000 --resume never --output_dir "$WORK/medquad_ft" \
  --storage_path "$WORK/storage"
bge-ray eval --model "$BASE" --model "$WORK/medquad_ft" --data "$DATA/medquad" \
  --query_max_len 64 --passage_max_len 256 --output benchmarks/results/eval_medquad
