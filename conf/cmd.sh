# Job launchers (Kaldi's cmd.sh convention), sourced by run.sh. Every per-job stage runs
#   $feat_cmd JOB=1:$nj <log> program args...   (stage 1), $train_cmd (stage 2), $score_cmd (stage 3)
# so moving the recipe to a cluster means changing these lines only (or --cmd-conf conf/cmd_slurm.sh).
# steps/launch_local.sh runs the jobs in parallel on this machine (run.pl's interface);
# it accepts and ignores --mem/--gpu/--num-threads/--time, and honours --max-jobs-run N.
# cluster=none tells run.sh that the jobs run here: training does not ask for GPUs (one process,
# on this machine's GPU if it has one), and several scoring jobs share its GPU and memory.
export cluster=none
export train_cmd="steps/launch_local.sh"
export score_cmd="steps/launch_local.sh"
export feat_cmd="steps/launch_local.sh"

# On a Slurm cluster use conf/cmd_slurm.sh (bash run.sh --cmd-conf conf/cmd_slurm.sh ...): the same
# variables pointing at steps/launch_slurm.sh, with cluster=slurm and the CPUs, memory and time each
# kind of job asks for.
