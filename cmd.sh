# Job submission, as in Kaldi/ESPnet recipes: every per-speaker loop in run.sh
# runs as `${cmd} JOB=1:N log.JOB.log command ... JOB ...`.
# local: parallel processes on this machine (pqm/launch.py). A cluster backend
# is added to pqm.launch.BACKENDS and chosen here the same way.
cmd_backend=${cmd_backend:-local}
cmd="python -m pqm.launch --backend ${cmd_backend}"
