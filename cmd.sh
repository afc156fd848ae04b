# Job submission, as in Kaldi/ESPnet recipes: every per-speaker loop in run.sh
# runs as `${cmd} [--max-jobs-run N] [--num-threads N] JOB=1:N log.JOB.log command ... JOB ...`.
# The default is pqm/launch.py:
#   local: parallel processes on this machine (at most --nj at once, jobs x threads <= cores)
#   slurm: one Slurm job array per loop; per-task resources in ${cluster_config}
# Choose with ./run.sh --cmd-backend slurm [--cluster-config conf/slurm.yaml].
# Your site's Kaldi script (run.pl, queue.pl, slurm.pl, with its options) works too:
#   cmd="utils/queue.pl --mem 4G"       (or PQM_CMD="..." ./run.sh ...)
# pqm.launch's extras (task names in the failure report) are then not there.
cmd_backend=${cmd_backend:-local}
cluster_config=${cluster_config:-conf/slurm.yaml}
cmd=${PQM_CMD:-"python -m pqm.launch --backend ${cmd_backend} --config ${cluster_config}"}
