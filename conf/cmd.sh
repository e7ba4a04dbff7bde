# Job launchers (Kaldi's cmd.sh convention), sourced by run.sh. Every per-job stage runs
#   $feat_cmd JOB=1:$nj <log> program args...   (or $train_cmd for training/scoring)
# so moving the recipe to a cluster means changing these lines only.
# steps/launch_local.sh runs the jobs in parallel on this machine (run.pl's interface);
# it accepts and ignores --mem/--gpu/--num-threads/--time, and honours --max-jobs-run N.
export train_cmd="steps/launch_local.sh"
export feat_cmd="steps/launch_local.sh"

# On a Slurm cluster (a later issue adds the launcher), use a slurm.pl-style launcher:
# export train_cmd="slurm.pl --mem 8G --time 72:00:00"; export feat_cmd="slurm.pl --mem 2G"
