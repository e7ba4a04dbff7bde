# Job launchers for a Slurm cluster (Kaldi's cmd.sh convention), the Slurm version of conf/cmd.sh:
#   bash run.sh --cmd-conf conf/cmd_slurm.sh ...
# Stage 1 runs `$feat_cmd JOB=1:$nj ...` (one array job), stage 2 `$train_cmd --gpu N <log> ...` (one
# job holding the GPUs: --ngpu, 1 by default; --nnodes M makes it M nodes x N GPUs) and stage 3
# `$score_cmd JOB=1:$nj ...` (with --gpu 1 when training asked for GPUs, or as --score-gpu says).
# steps/launch_slurm.sh submits with sbatch --chdir=. --export=ALL --requeue and waits; the per-job
# logs are where launch_local.sh would write them, Slurm's own output in <logdir>/slurm/. Ctrl-C, kill
# or a dropped ssh session cancel the jobs; a preempted or requeued job is followed and resumes.
# Options: --mem --time --num-threads (-> --cpus-per-task) --gpu (-> --gres=gpu:N) --cpus-per-gpu
# --mem-per-gpu --nodes --max-jobs-run --partition --account, and --sbatch-opt WORD for anything
# else (e.g. --sbatch-opt --qos=high). Try a test job on a new cluster:
#   steps/launch_slurm.sh --mem 1G JOB=1:2 /tmp/t/log/hello.JOB.log echo hello from JOB
export cluster=slurm
# Each size below can be set before this file is sourced (local/slurm/cmd_local_cluster.sh does so).

# Time limits. Many clusters cap a job at 24-48 h, and the paper's 500 epochs on VoxCeleb2 take
# longer than that on one GPU: when training stops at its limit, re-running the same run.sh command
# resumes it from its newest checkpoint (one per epoch), losing at most the epoch in progress.
train_time=${train_time:-48:00:00}
score_time=${score_time:-12:00:00}   # Vox1-E/H (580,000 trials) on a CPU is the long case
feat_time=${feat_time:-4:00:00}

# Training, per GPU (Slurm multiplies by --ngpu, and by --nnodes):
# CPUs: one rank's main process + its train.num_workers loader workers = 1 + 8 (conf/{tap,sap,cap}.yaml)
#   = 9; change it with train.num_workers. With --ngpu 0 (CPU training) the job gets one GPU's share.
# Memory: measured on a CPU run of conf/cap.yaml (4-speaker batches; the batch itself is 200 x 3 crops
#   x 200 frames x 40 x 4 B = 19 MB): main process 1.0 GB RSS, each loader worker 0.42 GB RSS, so
#   1.0 + 8 x 0.42 = 4.4 GB; a CUDA context and pinned batches add host memory not measured here, so
#   12 GB a GPU leaves that room.
train_cpus_per_gpu=${train_cpus_per_gpu:-9}
train_mem_per_gpu=${train_mem_per_gpu:-12G}

# Scoring, per job (--nj jobs): 4 CPUs for torch's threads (trunk and trial batches on a CPU; on a GPU
# the main thread reads the crops). Memory: the scorer's process (0.78 GB max RSS measured on the tiny
# corpus) plus its cache of partner-independent rows, which is given half of what the job's limit
# leaves (capsv.resources): a CAP row is 10 crops x (128 x 88 x 2 + 2 x 128) floats x 4 B = 0.91 MB, so
# 16 GB holds (16 - 0.8) / 2 / 0.91 MB = 8,300 utterances, Vox1-O's 4,715 in memory; larger lists
# (Vox1-E: 145,000 utterances) are scored from a scratch file block by block at any size.
score_cpus=${score_cpus:-4}
score_mem=${score_mem:-16G}

# Features: one utterance at a time (Kaldi fbank; ffmpeg for m4a), one CPU; the job measured 0.67 GB max
# RSS on the tiny corpus (python, torch, torchaudio; a VoxCeleb utterance adds a few MB), so 2 GB.
feat_mem=${feat_mem:-2G}

export feat_cmd="steps/launch_slurm.sh --mem $feat_mem --time $feat_time"
export train_cmd="steps/launch_slurm.sh --cpus-per-gpu $train_cpus_per_gpu --mem-per-gpu $train_mem_per_gpu --time $train_time"
export score_cmd="steps/launch_slurm.sh --num-threads $score_cpus --mem $score_mem --time $score_time"

# On a cluster with partitions and accounts, name them here, e.g.:
# export feat_cmd="steps/launch_slurm.sh --partition cpu --account myproj --mem $feat_mem --time $feat_time"
# export train_cmd="steps/launch_slurm.sh --partition gpu --account myproj --cpus-per-gpu $train_cpus_per_gpu --mem-per-gpu $train_mem_per_gpu --time $train_time"
