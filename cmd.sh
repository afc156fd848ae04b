# Job submission, as in Kaldi/ESPnet recipes: every per-speaker loop in run.sh
# runs as `${cmd} JOB=1:N log.JOB.log command ... JOB ...` (pqm/launch.py).
#   local: parallel processes on this machine (at most --nj at once, jobs x threads <= cores)
#   slurm: one Slurm job array per loop; per-task resources in ${cluster_config}
# Choose with ./run.sh --cmd-backend slurm [--cluster-config conf/slurm.yaml].
cmd_backend=${cmd_backend:-local}
cluster_config=${cluster_config:-conf/slurm.yaml}
cmd="python -m pqm.launch --backend ${cmd_backend} --config ${cluster_config}"
