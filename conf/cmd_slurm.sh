# Job launchers for a Slurm cluster (Kaldi's cmd.sh convention), the Slurm version of conf/cmd.sh:
#   bash run.sh --cmd-conf conf/cmd_slurm.sh ...
# Stage 1 runs `$feat_cmd JOB=1:$nj ...` (one array job), stage 2 `$train_cmd --gpu N <log> ...`
# (one job holding the GPUs; run.sh adds --gpu itself) and stage 3 `$train_cmd JOB=1:$nj ...`.
# steps/launch_slurm.sh submits with sbatch --chdir=. --export=ALL and waits; the per-job logs
# are where launch_local.sh would write them, Slurm's own output in <logdir>/slurm/.
# Options: --mem --time --num-threads (-> --cpus-per-task) --gpu (-> --gres=gpu:N) --max-jobs-run
# --partition --account, and --sbatch-opt WORD for anything else (e.g. --sbatch-opt --qos=high).
# Memory: feature jobs hold one utterance at a time; training and scoring hold a model and a
# batch (raise --mem for the paper's 200-speaker batches). Try a test job on a new cluster:
#   steps/launch_slurm.sh --mem 1G JOB=1:2 /tmp/t/log/hello.JOB.log echo hello from JOB
export feat_cmd="steps/launch_slurm.sh --mem 2G --time 4:00:00"
export train_cmd="steps/launch_slurm.sh --mem 8G --time 72:00:00"

# On a cluster with partitions and accounts, name them here, e.g.:
# export feat_cmd="steps/launch_slurm.sh --partition cpu --account myproj --mem 2G --time 4:00:00"
# export train_cmd="steps/launch_slurm.sh --partition gpu --account myproj --num-threads 8 --mem 32G --time 72:00:00"
