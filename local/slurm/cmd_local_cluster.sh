# conf/cmd_slurm.sh sized for the test cluster of local/slurm/start_local_cluster.sh (2 CPUs, 2 GPUs
# counted but not present, the host's memory): the same launchers and options, small enough that
# training, two scoring jobs and two feature jobs each fit.
#   bash run.sh --cmd-conf local/slurm/cmd_local_cluster.sh ...
train_cpus_per_gpu=1 train_mem_per_gpu=2G
score_cpus=1 score_mem=2G
feat_mem=1G
. conf/cmd_slurm.sh
